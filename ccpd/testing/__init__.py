"""Test and benchmark helpers shipped with ccpd (a loopback fake upstream)."""

"""Durable usage history: samples, hour and day rollups, reroute cooldowns.

:class:`IStore` is what the rest of ccpd relies on; :class:`~ccpd.store.sqlite.SQLiteStore` is
the implementation (a file, or ``:memory:`` when ``[store] persist = false``). The request path
never waits on it: :class:`~ccpd.store.writer.SampleWriter` batches samples in the background.
"""
from __future__ import annotations

from zope.interface import Interface


class IStore(Interface):
    """Every method returns a Deferred; the work runs off the reactor thread."""

    def run(function, *args):
        """Run ``function(cursor, *args)`` (a :mod:`ccpd.store.queries` function) in one
        transaction; fire with its result."""

    def size_bytes():
        """Bytes on disk (database and its WAL), 0 in memory. Synchronous."""

"""The store interface the daemon relies on (see :mod:`ccpd.store.sqlite`)."""
from __future__ import annotations

from zope.interface import Interface


class IStore(Interface):
    """Every method returns a Deferred; the work runs off the reactor thread."""

    def run(function, *args):
        """Run ``function(cursor, *args)`` (a :mod:`ccpd.store.queries` function) in one
        transaction; fire with its result."""

    def size_bytes():
        """Bytes on disk (database and its WAL), 0 in memory: an int (SQLite) or a Deferred
        of one (PostgreSQL)."""

"""The store interface the daemon relies on (:mod:`ccpd.store.sqlite`,
:mod:`ccpd.store.postgres`), and what both stores share: an adbapi pool made at start, a
schema migrated then, the pool closed at stop."""
from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger
from zope.interface import Interface

log = Logger()


class IStore(Interface):
    """Every method returns a Deferred; the work runs off the reactor thread."""

    def run(function, *args):
        """Run ``function(cursor, *args)`` (a :mod:`ccpd.store.queries` function) in one
        transaction; fire with its result."""

    def size_bytes():
        """Bytes on disk (database and its WAL), 0 in memory: an int (SQLite) or a Deferred
        of one (PostgreSQL)."""


class PooledStore(service.Service):
    """A store over an adbapi ``pool``; ``location`` names it in the log."""

    name = "store"
    location = ""
    pool = None
    ready = None  # fires with the (from, to) schema versions once migrated

    def _migrated(self, versions):
        before, after = versions
        if before != after:
            log.info("store {location}: schema version {before} -> {after}",
                     location=self.location, before=before, after=after)
        return versions

    def stopService(self):
        super().stopService()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

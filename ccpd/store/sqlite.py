"""The SQLite store over ``twisted.enterprise.adbapi``: one connection in one thread, WAL
journal, schema migrated in place when the service starts.
"""
from __future__ import annotations

import os

from twisted.application import service
from twisted.enterprise import adbapi
from twisted.logger import Logger
from zope.interface import implementer

from ccpd.store.interface import IStore
from ccpd.store.schema import migrate

log = Logger()

MEMORY = ":memory:"


def _configure(connection) -> None:
    """Per connection: WAL lets readers (``ccp db``) work while ccpd writes; NORMAL
    synchronous is durable across process crashes in WAL mode (the JSONL covers power loss)."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=5000")


@implementer(IStore)
class SQLiteStore(service.Service):
    name = "store"

    def __init__(self, path: str, reactor):
        self.path = path
        self.reactor = reactor
        self.pool: adbapi.ConnectionPool | None = None
        self.ready = None

    def startService(self):
        super().startService()
        if self.path != MEMORY:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # One connection (cp_max=1): SQLite has one writer anyway, and ":memory:" lives in it.
        self.pool = adbapi.ConnectionPool(
            "sqlite3", self.path, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=_configure, cp_reactor=self.reactor, cp_noisy=False)
        self.ready = self.pool.runInteraction(migrate)
        self.ready.addCallback(self._migrated)
        return self.ready

    def _migrated(self, versions):
        before, after = versions
        if before != after:
            log.info("store {path}: schema version {before} -> {after}", path=self.path,
                     before=before, after=after)
        return versions

    def stopService(self):
        super().stopService()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def run(self, function, *args):
        return self.pool.runInteraction(function, *args)

    def size_bytes(self) -> int:
        if self.path == MEMORY:
            return 0
        return sum(os.path.getsize(name) for name in (self.path, self.path + "-wal")
                   if os.path.exists(name))

"""The SQLite store over ``twisted.enterprise.adbapi``: one connection in one thread, WAL
journal, schema migrated in place when the service starts.
"""
from __future__ import annotations

import os

from twisted.enterprise import adbapi
from zope.interface import implementer

from ccpd.store.interface import IStore, PooledStore
from ccpd.store.schema import migrate

MEMORY = ":memory:"


def _configure(connection) -> None:
    """Per connection: WAL lets readers (``ccp db``) work while ccpd writes; NORMAL
    synchronous is durable across process crashes in WAL mode (the JSONL covers power loss)."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=5000")


@implementer(IStore)
class SQLiteStore(PooledStore):
    def __init__(self, path: str, reactor):
        self.path = self.location = path
        self.reactor = reactor

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

    def run(self, function, *args):
        return self.pool.runInteraction(function, *args)

    def size_bytes(self) -> int:
        if self.path == MEMORY:
            return 0
        return sum(os.path.getsize(name) for name in (self.path, self.path + "-wal")
                   if os.path.exists(name))

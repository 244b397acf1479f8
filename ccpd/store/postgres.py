"""The PostgreSQL store of team mode (``[store] url``), over ``twisted.enterprise.adbapi`` with
psycopg 3: the same :mod:`ccpd.store.queries` functions as the SQLite store, the same schema
versions (``schema/postgresql/``), migrated in one transaction under an advisory lock so that
daemons starting together do it once.

This module is imported only when a URL is configured: a single workstation never loads psycopg.
"""
from __future__ import annotations

import psycopg
from twisted.enterprise import adbapi
from zope.interface import implementer

from ccpd.config import database_location
from ccpd.store import queries
from ccpd.store.interface import IStore, PooledStore
from ccpd.store.queries import PostgresCursor
from ccpd.store.schema import LATEST, POSTGRESQL, migrate

CONNECT_TIMEOUT_S = 5
POOL_MAX = 3   # the sample writer, the team ledger's reads and the rest (roller, API queries)


def _in_transaction(connection, function, *args):
    with connection.transaction(), connection.cursor() as cursor:
        return function(PostgresCursor(cursor), *args)


def _statements(connection, function, *args):
    with connection.cursor() as cursor:
        return function(PostgresCursor(cursor), *args)


def _autocommit(connection) -> None:
    """Connections are in autocommit mode: a statement that needs no transaction around it is
    one round trip (no BEGIN and COMMIT: on this machine ~0.15 ms each);
    :meth:`PostgresStore.run` opens a transaction where one is needed."""
    connection.autocommit = True


class _Connection(adbapi.Connection):
    """A connection the server dropped (a restart, a crash) is closed and forgotten quietly:
    the interaction's own error says what happened, and :meth:`PostgresStore.run` tries again
    (adbapi would log two tracebacks per dead connection)."""

    def rollback(self):
        if self._connection.broken or self._connection.closed:
            self._pool.disconnect(self._connection)
            return
        super().rollback()


class _Pool(adbapi.ConnectionPool):
    connectionFactory = _Connection


@implementer(IStore)
class PostgresStore(PooledStore):
    errors = (psycopg.Error, adbapi.ConnectionLost)  # what a database away fails with

    def __init__(self, url: str, instance: str, reactor):
        self.url = url
        self.location = database_location(url)  # what logs and answers may show
        self.instance = instance
        self.reactor = reactor

    def startService(self):
        super().startService()
        # cp_reconnect: a connection found dead after a failure is dropped, the next
        # interaction opens a new one (see run() for the one retry)
        self.pool = _Pool(
            "psycopg", self.url, connect_timeout=CONNECT_TIMEOUT_S,
            application_name=f"ccpd {self.instance}"[:63], cp_min=1, cp_max=POOL_MAX,
            cp_reconnect=True, cp_noisy=False, cp_openfun=_autocommit, cp_reactor=self.reactor)
        self.ready = self.run(migrate, LATEST, POSTGRESQL)
        self.ready.addCallback(self._migrated)
        return self.ready

    def run(self, function, *args):
        """``function(cursor, *args)`` in one transaction — or without one, one round trip
        less each side, when it says ``needs_transaction = False`` (a statement is whole on
        its own, and sees one snapshot); again on a new connection while it fails for a lost
        connection (after a server restart every pooled connection is dead until used: up
        to ``POOL_MAX`` of them). Every function of :mod:`ccpd.store.queries` is safe to
        repeat."""
        how = _in_transaction if getattr(function, "needs_transaction", True) else _statements
        return self._run(how, function, args, POOL_MAX)

    def _run(self, how, function, args, retries: int):
        d = self.pool.runWithConnection(how, function, *args)
        if retries:
            d.addErrback(self._again, how, function, args, retries)
        return d

    def _again(self, failure, how, function, args, retries: int):
        failure.trap(psycopg.OperationalError, adbapi.ConnectionLost)
        if self.pool is None:
            return failure
        return self._run(how, function, args, retries - 1)

    def size_bytes(self):
        """A Deferred of the database's size on disk."""
        return self.run(queries.database_size)

"""The real PostgreSQL of the tests (tests/pg.py and the ``postgres`` fixture): it serves, its
databases are apart, it survives a restart and a crash as a server does, it leaves nothing
running; and psycopg 3 works through ``twisted.enterprise.adbapi`` as the store will use it."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import psycopg
import pytest
import pytest_twisted
from twisted.enterprise import adbapi
from twisted.internet import reactor, task

from tests import pg
from tests.support import logged_failures


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, connect_timeout=5)


def count_rows(dsn: str, table: str = "t") -> int:
    with connect(dsn) as connection:
        return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# -- the fixture ----------------------------------------------------------------------------------

def test_a_fresh_database_takes_a_table_rows_and_queries(postgres):
    assert postgres.dsn == f"postgresql://ccpd@127.0.0.1:{postgres.port}/{postgres.name}"
    assert postgres.host == "127.0.0.1"
    with connect(postgres.dsn) as connection:
        connection.execute("CREATE TABLE t (ts DOUBLE PRECISION, rid TEXT, n INT, "
                           "PRIMARY KEY (ts, rid))")
        connection.execute("INSERT INTO t VALUES (%s, %s, %s), (%s, %s, %s)",
                           (1.5, "a", 7, 2.5, "b", 8))
        connection.commit()
        rows = connection.execute("SELECT ts, rid, n FROM t ORDER BY ts").fetchall()
        assert rows == [(1.5, "a", 7), (2.5, "b", 8)]
        who = connection.execute("SELECT current_user, current_database(), "
                                 "current_setting('server_encoding'), "
                                 "current_setting('fsync')").fetchone()
        assert who == ("ccpd", postgres.name, "UTF8", "off")


def test_fresh_databases_are_independent(postgres):
    other = postgres.server.fresh_database()
    try:
        assert other.name != postgres.name
        with connect(postgres.dsn) as connection:
            connection.execute("CREATE TABLE t (n INT)")
            connection.execute("INSERT INTO t VALUES (1)")
        with connect(other.dsn) as connection:
            assert connection.execute("SELECT to_regclass('t')").fetchone() == (None,)
            connection.execute("CREATE TABLE t (n INT)")
        assert count_rows(other.dsn) == 0
        assert count_rows(postgres.dsn) == 1
    finally:
        other.drop()
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        connect(other.dsn)


def test_a_database_may_be_copied_from_one_made_before(postgres):
    # E.g. a schema migrated once and copied for each test (nobody may be connected to the
    # database copied).
    with connect(postgres.dsn) as connection:
        connection.execute("CREATE TABLE t (n INT)")
        connection.execute("INSERT INTO t VALUES (1)")
    copy = postgres.server.fresh_database(template=postgres.name)
    try:
        assert count_rows(copy.dsn) == 1
    finally:
        copy.drop()


def test_restart_keeps_the_data_and_the_dsn(postgres):
    dsn, server = postgres.dsn, postgres.server
    with connect(dsn) as connection:
        connection.execute("CREATE TABLE t (n INT)")
        connection.execute("INSERT INTO t SELECT generate_series(1, 100)")
    idle = connect(dsn)
    try:
        started = time.monotonic()
        server.restart()
        assert time.monotonic() - started < 5
        assert postgres.dsn == dsn and server.running
        # A connection open across the restart is cut off (it learns so when next used)...
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    finally:
        idle.close()
    # ... a new one finds everything where it was.
    assert count_rows(dsn) == 100


def test_after_kill_connections_fail_until_it_is_started_again(postgres):
    server = postgres.server
    connection = connect(postgres.dsn)
    connection.execute("CREATE TABLE t (n INT)")
    connection.execute("INSERT INTO t VALUES (1)")
    connection.commit()
    connection.execute("INSERT INTO t VALUES (2)")   # in flight: never committed
    server.kill()
    connection.close()
    assert not server.running
    assert server.processes() == []   # the children went with the postmaster
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(postgres.dsn)
    assert time.monotonic() - started < 1   # refused at once, no waiting on a timeout
    server.start()
    # Crash recovery: what was committed is there (fsync is off, synchronous_commit is not).
    assert count_rows(postgres.dsn) == 1


def test_a_committed_row_survives_kill_even_right_after_commit(postgres):
    # Why synchronous_commit stays on: with it off, the last commits before a kill are lost.
    with connect(postgres.dsn) as connection:
        connection.autocommit = True
        connection.execute("CREATE TABLE t (n INT)")
        for n in range(50):
            connection.execute("INSERT INTO t VALUES (%s)", (n,))
        postgres.server.kill()
    postgres.server.start()
    assert count_rows(postgres.dsn) == 50


# -- the server on its own ------------------------------------------------------------------------

def _shm_segments() -> set[str]:
    with open("/proc/sysvipc/shm", encoding="ascii") as f:
        return {line.split()[1] for line in f.readlines()[1:]}


def _dev_shm() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("PostgreSQL.")}


def _pgrep(directory: str) -> str:
    done = subprocess.run(["pgrep", "-a", "-f", directory], capture_output=True, text=True,
                          timeout=10, check=False)
    return done.stdout


@pytest.mark.parametrize("ending", ["stopped", "failed", "killed"])
def test_the_server_leaves_nothing_behind(ending):
    reason = pg.skip_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL: {reason}")
    shm_before, dev_shm_before = _shm_segments(), _dev_shm()
    with pytest.raises(RuntimeError, match="test fails") if ending == "failed" else \
            contextlib.nullcontext():
        with pg.PostgresServer() as server:
            directory = server.directory
            processes = server.processes()
            assert len(processes) >= 4   # postmaster, checkpointer, writers, ...
            if shutil.which("pgrep"):
                assert directory in _pgrep(directory)   # the postmaster names it
            with connect(server.dsn) as connection:
                connection.execute("SELECT 1")
            if ending == "killed":
                server.kill()
            if ending == "failed":
                raise RuntimeError("the test fails")
    for pid in processes:
        assert not os.path.exists(f"/proc/{pid}/cwd") or \
            not os.readlink(f"/proc/{pid}/cwd").startswith(directory)
    assert server.processes() == []
    if shutil.which("pgrep"):
        assert _pgrep(directory) == ""
    assert not os.path.exists(directory)
    assert _shm_segments() <= shm_before   # a killed postmaster's segment removed too
    assert _dev_shm() <= dev_shm_before


def test_a_server_that_cannot_start_is_cleaned_up():
    reason = pg.skip_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL: {reason}")
    server = pg.PostgresServer(settings={"shared_buffers": "'not a size'"})
    with pytest.raises(RuntimeError, match="shared_buffers"):
        server.start()
    assert server.processes() == []
    assert not os.path.exists(server.directory)


def test_skip_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(pg, "_cluster", None)
    monkeypatch.setattr(pg.shutil, "which", lambda name: None)
    monkeypatch.setattr(pg.glob, "glob", lambda pattern: [])
    assert "PostgreSQL is not installed" in pg.skip_reason()
    assert "PostgreSQL is not installed" in pg.skip_reason()   # remembered


# -- psycopg 3 through adbapi ---------------------------------------------------------------------

def make_pool(dsn: str) -> adbapi.ConnectionPool:
    """How the PostgreSQL store is to make its pool: ``psycopg`` is the DB-API module; the DSN
    (positional, psycopg.connect's ``conninfo``) and libpq keywords (``connect_timeout``) go to
    ``psycopg.connect``; autocommit stays off, since adbapi commits or rolls back each
    interaction itself; ``cp_reconnect`` drops a connection found dead (after a failure)."""
    return adbapi.ConnectionPool(
        "psycopg", dsn, connect_timeout=5, application_name="ccpd-test",
        cp_min=1, cp_max=1, cp_reconnect=True, cp_noisy=False, cp_reactor=reactor)


def _create_and_insert(cursor, rows):
    cursor.execute("CREATE TABLE IF NOT EXISTS t (ts DOUBLE PRECISION, rid TEXT, "
                   "PRIMARY KEY (ts, rid))")
    # psycopg's paramstyle is pyformat: %s (or %(name)s), never sqlite3's ?
    cursor.executemany("INSERT INTO t VALUES (%s, %s) ON CONFLICT DO NOTHING", rows)
    return cursor.rowcount   # summed over executemany: the rows that were new


def _select(cursor):
    cursor.execute("SELECT ts, rid FROM t ORDER BY ts, rid")
    return cursor.fetchall()


@pytest_twisted.ensureDeferred
async def test_adbapi_runs_interactions_on_psycopg(postgres):
    pool = make_pool(postgres.dsn)
    try:
        assert pool.dbapi is psycopg and psycopg.paramstyle == "pyformat"
        assert await pool.runInteraction(_create_and_insert, [(1.0, "a"), (2.0, "b")]) == 2
        assert await pool.runInteraction(_create_and_insert, [(1.0, "a"), (3.0, "c")]) == 1
        assert await pool.runInteraction(_select) == [(1.0, "a"), (2.0, "b"), (3.0, "c")]

        def fails(cursor):
            cursor.execute("INSERT INTO t VALUES (%s, %s)", (4.0, "d"))
            raise ValueError("rolled back")

        with pytest.raises(ValueError):
            await pool.runInteraction(fails)
        assert await pool.runQuery("SELECT count(*) FROM t") == [(3,)]
        assert await pool.runQuery("SELECT application_name FROM pg_stat_activity "
                                   "WHERE pid = pg_backend_pid()") == [("ccpd-test",)]
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_adbapi_after_a_restart_fails_once_then_reconnects(postgres):
    # cp_reconnect is lazy: the pool's connection is found dead by the first interaction after
    # the restart, which fails (with psycopg's error, not adbapi's ConnectionLost) and is not
    # retried; adbapi logs "Rollback failed" for it; the next interaction connects anew.
    pool = make_pool(postgres.dsn)
    try:
        await pool.runInteraction(_create_and_insert, [(1.0, "a")])
        for crash in (postgres.server.restart, postgres.server.kill):
            crash()
            postgres.server.start()
            with logged_failures() as failures:
                with pytest.raises(psycopg.OperationalError):
                    await pool.runInteraction(_select)
            assert any(event.get("why") == "Rollback failed" for event in failures)
            assert await pool.runInteraction(_select) == [(1.0, "a")]
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_adbapi_interaction_fails_at_once_when_the_server_dies_under_it(postgres):
    pool = make_pool(postgres.dsn)
    try:
        await pool.runQuery("SELECT 1")
        slow = pool.runQuery("SELECT pg_sleep(20)")
        await task.deferLater(reactor, 0.3, lambda: None)
        started = time.monotonic()
        postgres.server.kill()
        with logged_failures():
            with pytest.raises(psycopg.OperationalError):
                await slow
        assert time.monotonic() - started < 5
        # while the server is down, an interaction fails (refused), and nothing hangs
        with pytest.raises(psycopg.OperationalError):
            await pool.runQuery("SELECT 1")
        postgres.server.start()
        assert await pool.runQuery("SELECT 1") == [(1,)]
    finally:
        pool.close()

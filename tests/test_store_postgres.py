"""The PostgreSQL store of team mode, on a real PostgreSQL server (tests/pg.py): the same schema
versions as SQLite, migrations safe when daemons start together, the store's queries on it
(samples unique per instance, the ledger's ``seq`` order, what one daemon reads of the others),
rollups for the team and per instance by one roller, and the adbapi store surviving a server
restart."""
from __future__ import annotations

import contextlib
import threading

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor

from ccpd.store import queries
from ccpd.store.postgres import PostgresStore
from ccpd.store.queries import PostgresCursor
from ccpd.store.schema import LATEST, POSTGRESQL, SQLITE, migrate, migrations, schema_version

T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC, on an hour


@contextlib.contextmanager
def cursor_on(dsn: str):
    """A store cursor on its own connection, committed at the end of the block."""
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        yield PostgresCursor(connection.cursor())
        connection.commit()


def sample(rid: str, ts: float, instance: str, tokens: int = 100, model: str = "glm-4.6",
           lane: str = "zai", op: str = "messages") -> tuple:
    return queries.sample_row({"ts": ts, "rid": rid, "model": model, "lane": lane, "op": op,
                               "input_tokens": tokens, "output_tokens": tokens // 10,
                               "dirty_ms": 500, "stream_ms": 400, "ttft_ms": 100 + tokens,
                               "status": 200}, instance)


@pytest.fixture
def db(postgres):
    with cursor_on(postgres.dsn) as cursor:
        migrate(cursor, LATEST, POSTGRESQL)
    return postgres


def test_both_dialects_have_the_same_schema_versions():
    assert [v for v, _ in migrations(POSTGRESQL)] == [v for v, _ in migrations(SQLITE)] \
        == list(range(1, LATEST + 1))


def test_the_migration_runs_once_when_daemons_start_together(postgres):
    results, errors = [], []
    start = threading.Barrier(4)

    def daemon():
        try:
            start.wait()
            with cursor_on(postgres.dsn) as cursor:
                results.append(migrate(cursor, LATEST, POSTGRESQL))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=daemon) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(results) == [(0, LATEST)] + [(LATEST, LATEST)] * 3
    with cursor_on(postgres.dsn) as cursor:
        assert schema_version(cursor) == LATEST
        cursor.execute("SELECT count(*) FROM schema_version")
        assert cursor.fetchone()[0] == LATEST


def test_an_older_schema_is_brought_to_the_latest_with_its_rows(postgres):
    with cursor_on(postgres.dsn) as cursor:
        assert migrate(cursor, 4, POSTGRESQL) == (0, 4)
        cursor.execute("INSERT INTO usage_sample (ts, rid, model, op, input_tokens, "
                       "output_tokens) VALUES (?, 'old', 'glm-4.6', 'messages', 7, 3)", (T0,))
    with cursor_on(postgres.dsn) as cursor:
        assert migrate(cursor, LATEST, POSTGRESQL) == (4, LATEST)
        cursor.execute("SELECT ts, instance, seq, input_tokens FROM usage_sample")
        assert cursor.fetchall() == [(T0, "", 1, 7)]  # times keep their precision (DOUBLE)


def test_samples_are_unique_per_instance_and_numbered_in_commit_order(db):
    with cursor_on(db.dsn) as cursor:
        assert queries.insert_samples(cursor, [sample("r1", T0 + 0.123456, "alice"),
                                               sample("r1", T0 + 0.123456, "bob")]) == 2
        assert queries.insert_samples(cursor, [sample("r1", T0 + 0.123456, "alice"),
                                               sample("r2", T0 + 1, "alice")]) == 1
        assert queries.insert_samples(cursor, []) == 0
        cursor.execute("SELECT seq, instance, rid, ts FROM usage_sample ORDER BY seq")
        assert cursor.fetchall() == [(1, "alice", "r1", T0 + 0.123456),
                                     (2, "bob", "r1", T0 + 0.123456), (4, "alice", "r2", T0 + 1)]
        assert queries.team_position(cursor) == 4


def test_a_daemon_reads_what_the_others_recorded_since_it_last_looked(db):
    with cursor_on(db.dsn) as cursor:
        queries.insert_samples(cursor, [sample("a1", T0, "alice", 100),
                                        sample("b1", T0 + 1, "bob", 200),
                                        sample("b2", T0 + 2, "bob", 0),        # no tokens
                                        sample("b3", T0 + 3, "bob", 50, op="count_tokens")])
        queries.save_cooldown(cursor, "glm-4.6", T0 + 600)
        queries.save_cooldown(cursor, "old-model", T0 - 1)
        queries.save_reading(cursor, ("zai", "five_hour", 0.5, T0 + 3600, "allowed", T0 + 5,
                                      "headers", None, None))
    with cursor_on(db.dsn) as cursor:
        position, rows, cooldowns, readings = queries.team_news(cursor, 0, "alice", T0, 0.0)
        assert position == 4
        assert rows == [("glm-4.6", T0 + 1, 200, 20, 0, 0, 0.5, "zai", "bob")]
        assert cooldowns == {"glm-4.6": T0 + 600}
        assert [r[:3] for r in readings] == [("zai", "five_hour", 0.5)]
        # nothing new: no rows, the readings already seen are not read again
        assert queries.team_news(cursor, 4, "alice", T0, T0 + 5)[1:] == \
            ([], {"glm-4.6": T0 + 600}, [])
        queries.insert_samples(cursor, [sample("c1", T0 + 9, "carol", 300)])
    with cursor_on(db.dsn) as cursor:
        assert queries.team_news(cursor, 4, "alice", T0, T0 + 5)[:2] == \
            (5, [("glm-4.6", T0 + 9, 300, 30, 0, 0, 0.5, "zai", "carol")])
        # the start-up restore: every instance's samples up to a position
        assert [r[8] for r in queries.recent_usage(cursor, T0, 4)] == ["alice", "bob"]


def test_an_uncommitted_insert_holds_the_next_one_so_seq_never_goes_back(db):
    """Inserts take the ledger lock: a sample committed after another always has a larger
    seq, so reading up to the newest seq never skips one committed later."""
    first = psycopg.connect(db.dsn, connect_timeout=5)
    try:
        queries.insert_samples(PostgresCursor(first.cursor()), [sample("slow", T0, "alice")])
        done = threading.Event()

        def second():
            with cursor_on(db.dsn) as cursor:
                queries.insert_samples(cursor, [sample("fast", T0, "bob")])
            done.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not done.wait(0.5)  # waits for the first transaction's lock
        first.commit()
        thread.join(10)
        assert done.is_set()
    finally:
        first.close()
    with cursor_on(db.dsn) as cursor:
        cursor.execute("SELECT rid FROM usage_sample ORDER BY seq")
        assert [r[0] for r in cursor.fetchall()] == ["slow", "fast"]


def test_rollups_for_the_team_and_per_instance_by_one_roller(db):
    with cursor_on(db.dsn) as cursor:
        queries.insert_samples(cursor, [sample("a1", T0 + 10, "alice", 100),
                                        sample("a2", T0 + 20, "alice", 300),
                                        sample("b1", T0 + 30, "bob", 200)])
    now = T0 + 600
    with cursor_on(db.dsn) as cursor:
        assert queries.roll_for_team(cursor, T0, now, 30, 300, False) == {"hours": 1, "days": 1}
        # another daemon's tick within the interval skips, unless it must re-roll
        assert queries.roll_for_team(cursor, T0, now + 60, 30, 300, False) is None
    with cursor_on(db.dsn) as cursor:
        assert queries.roll_for_team(cursor, T0, now + 60, 30, 300, True) is not None
        team = queries.query_rollups(cursor, "hour", None, T0)["glm-4.6"]
        alice = queries.query_rollups(cursor, "hour", None, T0, "alice")["glm-4.6"]
        bob = queries.query_rollups(cursor, "day", None, T0, "bob")["glm-4.6"]
        assert [(e["count"], e["in_tokens"]) for e in team] == [(3, 600)]
        assert [(e["count"], e["in_tokens"], e["p50_ttft"]) for e in alice] == [(2, 400, 300)]
        assert [(e["count"], e["in_tokens"]) for e in bob] == [(1, 200)]
        assert [r["rid"] for r in queries.query_samples(cursor, 0, None, 10, "bob")] == ["b1"]
        assert len(queries.query_samples(cursor, 0, None, 10)) == 3
        assert queries.status(cursor)["rows"] == {"usage_sample": 3, "usage_rollup_hour": 3,
                                                  "usage_rollup_day": 3}
        assert queries.database_size(cursor) > 1_000_000


def test_a_second_roller_skips_while_the_first_holds_the_lock(db):
    holder = psycopg.connect(db.dsn, connect_timeout=5)
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (queries.ROLLER_LOCK,))
        with cursor_on(db.dsn) as cursor:
            assert queries.roll_for_team(cursor, T0, T0 + 60, 30, 300, True) is None
    finally:
        holder.close()


@pytest_twisted.ensureDeferred
async def test_the_store_service_answers_again_after_the_server_restarts(postgres):
    store = PostgresStore(postgres.dsn, "alice", reactor)
    await store.startService()
    try:
        assert await store.run(queries.insert_samples, [sample("r1", T0, "alice")]) == 1
        postgres.server.restart()
        # the pool's connection died with the server: run() tries once more, on a new one
        assert await store.run(queries.insert_samples, [sample("r2", T0 + 1, "alice")]) == 1
        assert await store.run(queries.team_position) == 2
        assert await store.size_bytes() > 0
        assert store.location == f"postgresql://ccpd@127.0.0.1:{postgres.port}/{postgres.name}"
    finally:
        store.stopService()

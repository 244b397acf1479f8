"""The store on real SQLite files: schema and migrations, writes, rollup math, retention, and
the writer and roller services driven by a Clock."""
from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from ccpd.metrics import Metrics
from ccpd.store import queries
from ccpd.store.roller import Roller
from ccpd.store.schema import LATEST, migrate, schema_version
from ccpd.store.sqlite import SQLiteStore
from ccpd.store.writer import BATCH_ROWS, SampleWriter

HOUR = 3600.0
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC, an hour boundary


def connect(path) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    cursor = connection.cursor()
    migrate(cursor)
    connection.commit()
    return connection


def record(ts, rid, model="glm-4.6", **fields) -> dict:
    return {"ts": ts, "rid": rid, "model": model, "lane": "zai", "op": "messages",
            "input_tokens": 100, "output_tokens": 50, "dirty_ms": 2000, "stream_ms": 1000,
            "ttft_ms": 300, "status": 200, "reroute_decision": "preferred", **fields}


def insert(connection, *records) -> int:
    count = queries.insert_samples(connection.cursor(), [queries.sample_row(r) for r in records])
    connection.commit()
    return count


# -- schema -------------------------------------------------------------------------------------

def test_schema_tables_index_and_version(tmp_path):
    connection = connect(tmp_path / "ccp.sqlite3")
    names = {row[0] for row in connection.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    assert {"usage_sample", "usage_rollup_hour", "usage_rollup_day", "sample_model_ts",
            "schema_version", "policy_cooldown"} <= names
    plan = " ".join(str(row) for row in connection.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM usage_sample WHERE model = 'm' AND ts > 0"))
    assert "sample_model_ts" in plan
    assert schema_version(connection.cursor()) == LATEST == 5
    # running it again changes nothing
    assert migrate(connection.cursor()) == (LATEST, LATEST)


def test_migration_from_version_1_keeps_the_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    connection = sqlite3.connect(path)
    assert migrate(connection.cursor(), upto=1) == (0, 1)
    connection.commit()
    columns = [row[1] for row in connection.execute("PRAGMA table_info(usage_sample)")]
    assert columns == ["ts", "rid", "model", "lane", "op", "input_tokens", "output_tokens",
                       "dirty_s", "stream_s", "ttft_ms", "status", "err_type", "decision",
                       "reroute_mode", "warn_pct_auto", "gap_seconds_p50", "gap_seconds_p95",
                       "gap_samples", "upstream", "h2", "header_mode"]
    connection.execute("INSERT INTO usage_sample (ts, rid, model, op, input_tokens, "
                       "output_tokens) VALUES (?, 'old', 'glm-4.6', 'messages', 7, 3)", (T0,))
    connection.commit()
    connection.close()

    upgraded = connect(path)
    assert schema_version(upgraded.cursor()) == LATEST
    row = upgraded.execute("SELECT input_tokens, cache_read_input_tokens, served_model, "
                           "upstream_model FROM usage_sample WHERE rid = 'old'").fetchone()
    assert row == (7, 0, None, None)


@pytest_twisted.ensureDeferred
async def test_sqlite_store_uses_wal_and_one_connection(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite3"), reactor)
    await store.startService()
    try:
        mode = await store.run(lambda cursor: cursor.execute("PRAGMA journal_mode").fetchone())
        assert mode == ("wal",)
        assert await store.run(queries.insert_samples, [queries.sample_row(record(T0, "a"))]) == 1
        assert store.size_bytes() > 0
    finally:
        store.stopService()


# -- writes and reads ---------------------------------------------------------------------------

def test_insert_is_idempotent_on_ts_and_rid(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    assert insert(connection, record(T0, "a"), record(T0, "b"), record(T0 + 1, "a")) == 3
    assert insert(connection, record(T0, "a"), record(T0 + 2, "c")) == 1
    rows = queries.query_samples(connection.cursor(), 0, None, 10)
    assert [(r["ts"], r["rid"]) for r in rows] == [(T0, "a"), (T0, "b"), (T0 + 1, "a"),
                                                  (T0 + 2, "c")]
    assert rows[0]["dirty_s"] == 2.0 and rows[0]["decision"] == "preferred"


def test_query_samples_filters_and_limits(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection, *(record(T0 + i, f"r{i}", model="a" if i % 2 else "b")
                         for i in range(10)))
    cursor = connection.cursor()
    assert [r["rid"] for r in queries.query_samples(cursor, T0 + 5, "a", 10)] == \
        ["r5", "r7", "r9"]
    assert len(queries.query_samples(cursor, 0, None, 4)) == 4


# -- rollups ------------------------------------------------------------------------------------

def test_hour_and_day_rollup_math_and_boundaries(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection,
           *(record(T0 + 60 * i, f"h0-{i}", ttft_ms=100 * (i + 1)) for i in range(10)),
           record(T0 + HOUR - 0.001, "edge", ttft_ms=5000),       # last instant of hour 0
           record(T0 + HOUR, "h1", output_tokens=500),           # first instant of hour 1
           record(T0 + 30, "err", status=529, ttft_ms=9),        # counted, not in TTFT
           record(T0 + 40, "count", op="count_tokens"),          # not a Messages request
           record(T0 + 50, "other", model="claude-x"))
    cursor = connection.cursor()
    assert queries.roll(cursor, T0, T0 + 2 * HOUR) == {"hours": 3, "days": 2}
    connection.commit()
    hours = queries.query_rollups(cursor, "hour", None, 0)
    [hour0, hour1] = hours["glm-4.6"]
    assert hour0["window_start"] == T0 and hour0["count"] == 12
    assert (hour0["in_tokens"], hour0["out_tokens"]) == (1200, 600)
    assert hour0["out_elr_tps"] == 50.0 and hour0["out_dirty_tps"] == 25.0  # 600/12 s, 600/24 s
    ttfts = sorted([100 * (i + 1) for i in range(10)] + [5000])
    assert hour0["p50_ttft"] == ttfts[5] == 600
    assert hour0["p90_ttft"] == pytest.approx(1000.0) and hour0["p99_ttft"] == \
        pytest.approx(1000 + 0.9 * 4000)
    assert (hour1["window_start"], hour1["count"], hour1["out_tokens"]) == (T0 + HOUR, 1, 500)
    assert hours["claude-x"][0]["count"] == 1
    [day] = queries.query_rollups(cursor, "day", "glm-4.6", 0)["glm-4.6"]
    assert (day["count"], day["in_tokens"], day["out_tokens"]) == (13, 1300, 1100)
    assert day["window_start"] == 1_799_971_200.0  # 2027-01-15 00:00 UTC


def test_rollup_is_idempotent_and_picks_up_late_samples(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection, record(T0 + 10, "a"))
    cursor = connection.cursor()
    queries.roll(cursor, T0, T0 + HOUR)
    first = queries.query_rollups(cursor, "hour", None, 0)
    queries.roll(cursor, T0, T0 + HOUR)
    assert queries.query_rollups(cursor, "hour", None, 0) == first
    assert queries.query_rollups(cursor, "day", None, 0)["glm-4.6"][0]["count"] == 1
    insert(connection, record(T0 + 20, "late"))
    queries.roll(cursor, T0, T0 + HOUR)
    assert queries.query_rollups(cursor, "hour", None, 0)["glm-4.6"][0]["count"] == 2
    assert queries.query_rollups(cursor, "day", None, 0)["glm-4.6"][0]["count"] == 2


def test_retention_trims_samples_after_a_week_and_rollups_after_retention(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection, record(T0, "old"), record(T0 + 8 * 86400, "new"))
    cursor = connection.cursor()
    queries.roll(cursor, T0, T0 + HOUR)
    queries.roll(cursor, T0 + 8 * 86400, T0 + 8 * 86400 + HOUR)
    assert queries.trim(cursor, T0 + 8 * 86400, retention_days=30) == 1
    assert [r["rid"] for r in queries.query_samples(cursor, 0, None, 10)] == ["new"]
    assert len(queries.query_rollups(cursor, "hour", None, 0)["glm-4.6"]) == 2
    queries.trim(cursor, T0 + 8 * 86400, retention_days=1)
    assert len(queries.query_rollups(cursor, "hour", None, 0)["glm-4.6"]) == 1
    assert len(queries.query_rollups(cursor, "day", None, 0)["glm-4.6"]) == 1


def test_cooldowns_are_saved_and_expire(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    cursor = connection.cursor()
    queries.save_cooldown(cursor, "glm-4.6", T0 + 300)
    queries.save_cooldown(cursor, "glm-4.6", T0 + 600)
    queries.save_cooldown(cursor, "other", T0 + 10)
    assert queries.load_cooldowns(cursor, T0 + 100) == {"glm-4.6": T0 + 600}


# -- writer and roller services -------------------------------------------------------------------

def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


class FlakyStore:
    """A store whose writes fail ``failures`` times, then land in a real SQLite connection."""

    def __init__(self, connection, failures: int):
        self.connection = connection
        self.failures = failures
        self.calls = 0

    def run(self, function, *args):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            return defer.fail(sqlite3.OperationalError("database is locked"))
        result = function(self.connection.cursor(), *args)
        self.connection.commit()
        return defer.succeed(result)

    def size_bytes(self):
        return 1234


def test_writer_batches_off_the_request_path_and_retries_without_loss(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    store, clock, metrics = FlakyStore(connection, failures=2), task.Clock(), Metrics()
    writer = SampleWriter(store, metrics, clock)
    writer.startService()
    for i in range(BATCH_ROWS + 10):
        writer.add(record(T0 + i, f"r{i}"))
    assert store.calls == 0  # nothing written while the request path runs
    clock.advance(0)         # a full batch flushes at once ... and fails
    assert store.calls == 1 and len(writer.queue) == BATCH_ROWS + 10
    clock.advance(1)         # retried after 1 s: fails again
    clock.advance(2)         # then after 2 s: lands, and the rest follows
    clock.advance(0)
    assert writer.queue == []
    assert connection.execute("SELECT count(*) FROM usage_sample").fetchone()[0] == \
        BATCH_ROWS + 10
    assert sample(metrics, "ccp_store_writes_total") == BATCH_ROWS + 10
    assert sample(metrics, "ccp_store_write_errors_total") == 2
    assert writer.stopService().called


def test_roller_ticks_on_its_interval_and_rolls_marked_samples(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection, record(T0 - 5 * HOUR, "recovered"), record(T0 + 5, "now"))
    clock = task.Clock()
    clock.advance(T0 + 10)
    metrics = Metrics()
    roller = Roller(FlakyStore(connection, failures=0), metrics, 300, 30, clock=clock)
    roller.mark(T0 - 5 * HOUR)
    roller.startService()  # first tick at start
    rollups = queries.query_rollups(connection.cursor(), "hour", None, 0)["glm-4.6"]
    assert [r["window_start"] for r in rollups] == [T0 - 5 * HOUR, T0]
    insert(connection, record(T0 + 100, "later"))
    clock.advance(300)
    assert queries.query_rollups(connection.cursor(), "hour", None, 0)["glm-4.6"][-1][
        "count"] == 2
    assert sample(metrics, "ccp_rollup_duration_seconds_sum") > 0
    assert sample(metrics, "ccp_store_size_bytes") == 1234
    roller.stopService()


def test_a_failing_rollup_tick_does_not_stop_the_roller(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection, record(T0, "a"))
    clock = task.Clock()
    clock.advance(T0 + 10)
    metrics = Metrics()
    roller = Roller(FlakyStore(connection, failures=1), metrics, 300, 30, clock=clock)
    roller.startService()
    assert sample(metrics, "ccp_store_write_errors_total") == 1
    clock.advance(300)
    assert queries.query_rollups(connection.cursor(), "hour", None, 0)["glm-4.6"][0][
        "count"] == 1
    roller.stopService()


def test_rolling_an_old_span_leaves_newer_rollups_alone_and_spans_any_age(tmp_path):
    connection = connect(tmp_path / "s.sqlite3")
    insert(connection, record(T0 + 30 * 86400, "new"))
    cursor = connection.cursor()
    queries.roll(cursor, T0 + 30 * 86400, T0 + 30 * 86400 + 60)
    # an import of old history, three weeks apart
    insert(connection, record(T0, "old1"), record(T0 + 10 * 86400, "old2"),
           record(T0 + 20 * 86400, "old3"))
    assert queries.roll_span(cursor, T0, T0 + 20 * 86400) == {"hours": 3, "days": 3}
    hours = queries.query_rollups(cursor, "hour", None, 0)["glm-4.6"]
    assert [h["window_start"] for h in hours] == [T0 + d * 86400 for d in (0, 10, 20, 30)]
    assert len(queries.query_rollups(cursor, "day", None, 0)["glm-4.6"]) == 4

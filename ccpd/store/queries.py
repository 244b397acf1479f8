"""The store's transaction functions: each takes a DB-API cursor (``sqlite3``, or the PostgreSQL
store's cursor, which takes the same ``?`` placeholders and says ``dialect = "postgresql"``), so
the daemon runs them through adbapi and tests and the ``ccp db`` commands on a plain connection.

On PostgreSQL (team mode) every insert of samples takes :data:`LEDGER_LOCK` for its
transaction, so the ``seq`` numbers of the samples become visible in order: a daemon that has
read every sample up to ``seq`` N will never find a later-committed one below N
(:func:`team_news`).
"""
from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from datetime import datetime, timezone

from ccpd.quotas import percentile

HOUR = 3600.0
DAY = 86400.0
SAMPLE_TTL_S = 7 * DAY  # samples are trimmed after a week; rollups keep retention_days

SAMPLE_COLUMNS = (
    "ts", "rid", "model", "lane", "op", "input_tokens", "output_tokens", "dirty_s", "stream_s",
    "ttft_ms", "status", "err_type", "decision", "reroute_mode", "warn_pct_auto",
    "gap_seconds_p50", "gap_seconds_p95", "gap_samples", "upstream", "h2", "header_mode",
    "served_model", "stream", "cache_creation_input_tokens", "cache_read_input_tokens",
    "upstream_model", "instance")
_INSERT_SAMPLE = (f"INSERT INTO usage_sample ({', '.join(SAMPLE_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(SAMPLE_COLUMNS))}) ON CONFLICT DO NOTHING")
LEDGER_LOCK = 0x63637064_0002   # PostgreSQL advisory lock: one sample insert at a time
ROLLER_LOCK = 0x63637064_0003   # PostgreSQL advisory lock: one roller for the team
TEAM = ""                       # the instance of rollups that cover every instance
_READING_COLUMNS = ("lane, plan_window, utilization, reset_at, status, observed_at, source, "
                    "surpassed_threshold, claim")


def is_postgresql(cursor) -> bool:
    return getattr(cursor, "dialect", None) == "postgresql"


@functools.lru_cache(maxsize=None)
def _placeholders(sql: str) -> str:
    """The store's SQL (sqlite3's ``?``) in psycopg's paramstyle (``%s``); none of it has ``%``."""
    return sql.replace("?", "%s")


class PostgresCursor:
    """A psycopg cursor that takes the ``?`` placeholders of :mod:`ccpd.store.queries`."""

    dialect = "postgresql"

    def __init__(self, cursor):
        self._cursor = cursor

    def execute(self, sql: str, args=None):
        return self._cursor.execute(_placeholders(sql), args)

    def executemany(self, sql: str, rows):
        return self._cursor.executemany(_placeholders(sql), rows)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def sample_row(record: dict, instance: str = "") -> tuple:
    """The ``usage_sample`` row of one ``usage.jsonl`` record, written by ``instance``."""
    def ms_to_s(name):
        return (record.get(name) or 0) / 1000.0

    return (
        record["ts"], record["rid"], record.get("model", ""), record.get("lane", ""),
        record.get("op", ""), record.get("input_tokens", 0), record.get("output_tokens", 0),
        ms_to_s("dirty_ms"), ms_to_s("stream_ms"), record.get("ttft_ms", 0),
        record.get("status", 0), record.get("err_type"),
        record.get("reroute_decision", "preferred"), record.get("reroute_mode"),
        record.get("warn_pct_auto"), record.get("gap_seconds_p50"),
        record.get("gap_seconds_p95"), record.get("gap_samples", 0), record.get("upstream", ""),
        0, record.get("header_mode"), record.get("served_model"),
        int(bool(record.get("stream"))), record.get("cache_creation_input_tokens", 0),
        record.get("cache_read_input_tokens", 0), record.get("upstream_model"), instance)


# keys only a ``ccp db export --jsonl`` row has, and only a usage.jsonl record has
_EXPORT_ONLY_KEYS = ("dirty_s", "decision")
_RECORD_ONLY_KEYS = ("dirty_ms", "reroute_decision")


def sample_row_of(line, instance: str = "") -> tuple | None:
    """The row of one parsed JSONL line — a ``usage.jsonl`` record (written by ``instance``)
    or a row of ``ccp db export --jsonl`` (which names its own) — or None when it is not a
    sample (no ``ts``/``rid``, badly typed values)."""
    if not isinstance(line, dict):
        return None
    ts, rid = line.get("ts"), line.get("rid")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) \
            or not isinstance(rid, str) or not rid:
        return None
    exported = (any(k in line for k in _EXPORT_ONLY_KEYS)
                and not any(k in line for k in _RECORD_ONLY_KEYS))
    try:
        if exported:
            return tuple(line.get(c) for c in SAMPLE_COLUMNS[:-1]) + (line.get("instance") or "",)
        return sample_row(line, instance)
    except (TypeError, ValueError, KeyError):  # e.g. "dirty_ms": "slow"
        return None


# PostgreSQL types of the sample columns: VALUES rows in a SELECT take no type from the table
_PG_TYPES = {"ts": "float8", "dirty_s": "float8", "stream_s": "float8", "ttft_ms": "float8",
             "warn_pct_auto": "float8", "gap_seconds_p50": "float8", "gap_seconds_p95": "float8",
             "input_tokens": "int8", "output_tokens": "int8",
             "cache_creation_input_tokens": "int8", "cache_read_input_tokens": "int8",
             "status": "int4", "gap_samples": "int4", "h2": "int4", "stream": "int4"}


PG_INSERT_ROWS = 100  # rows per statement: the statements cached stay small


@functools.lru_cache(maxsize=PG_INSERT_ROWS)
def _postgresql_insert(count: int) -> str:
    """One statement inserting ``count`` samples under :data:`LEDGER_LOCK`, taken (by the
    materialised CTE, before any row gets its ``seq``) for the statement's own transaction."""
    row = "(" + ", ".join(f"?::{_PG_TYPES.get(c, 'text')}" for c in SAMPLE_COLUMNS) + ")"
    return (f"WITH ledger AS MATERIALIZED (SELECT pg_advisory_xact_lock({LEDGER_LOCK})) "
            f"INSERT INTO usage_sample ({', '.join(SAMPLE_COLUMNS)}) SELECT v.* FROM "
            f"(VALUES {', '.join([row] * count)}) AS v, ledger ON CONFLICT DO NOTHING")


def insert_samples(cursor, rows: list[tuple]) -> int:
    """Insert rows, ignoring those already stored (same ``(ts, rid)``, on PostgreSQL same
    ``(instance, ts, rid)``); how many were new. On PostgreSQL a statement per
    :data:`PG_INSERT_ROWS` rows, each whole on its own: no transaction is needed around them
    (a team's writer sends each sample at once: one round trip)."""
    if not is_postgresql(cursor):
        cursor.executemany(_INSERT_SAMPLE, rows)
        return cursor.rowcount
    inserted = 0
    for start in range(0, len(rows), PG_INSERT_ROWS):
        chunk = rows[start:start + PG_INSERT_ROWS]
        cursor.execute(_postgresql_insert(len(chunk)), [value for row in chunk for value in row])
        inserted += cursor.rowcount
    return inserted


insert_samples.needs_transaction = False


def query_samples(cursor, since: float, model: str | None, limit: int,
                  instance: str | None = None) -> list[dict]:
    """Samples from ``since`` on, oldest first, at most ``limit``; of one ``instance`` or of
    all (None)."""
    sql = f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM usage_sample WHERE ts >= ?"
    args: list = [since]
    if model:
        sql += " AND model = ?"
        args.append(model)
    if instance is not None:
        sql += " AND instance = ?"
        args.append(instance)
    cursor.execute(sql + " ORDER BY ts, rid LIMIT ?", (*args, limit))
    return [dict(zip(SAMPLE_COLUMNS, row)) for row in cursor.fetchall()]


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def roll(cursor, since: float, now: float) -> dict:
    """Recompute the hour rollups of every hour from ``since``'s to ``now``'s, then the day
    rollups of the days those hours are in; rollups outside that span are left alone.
    Rerunning over the same window changes nothing. Only Messages requests
    (``op = 'messages'``) are rolled up. Rollups of instance :data:`TEAM` cover every sample;
    on a shared store (PostgreSQL) each instance gets its own as well."""
    # never recompute hours whose samples the sample TTL may already have trimmed
    first_hour = math.floor(max(since, now - SAMPLE_TTL_S + HOUR) / HOUR) * HOUR
    end = math.floor(now / HOUR) * HOUR + HOUR  # the end of now's hour
    per_instance = is_postgresql(cursor)
    # coalesce: rows imported from elsewhere may lack a value; one NULL must not stop rollups
    cursor.execute("SELECT model, ts, coalesce(input_tokens, 0), coalesce(output_tokens, 0), "
                   "coalesce(dirty_s, 0), coalesce(stream_s, 0), coalesce(ttft_ms, 0), "
                   "coalesce(status, 0), instance FROM usage_sample "
                   "WHERE ts >= ? AND ts < ? AND op = 'messages'", (first_hour, end))
    hours: dict[tuple[float, str, str], list] = defaultdict(list)
    for row in cursor.fetchall():
        hour = math.floor(row[1] / HOUR) * HOUR
        hours[(hour, row[0], TEAM)].append(row)
        if per_instance:
            hours[(hour, row[0], row[8])].append(row)
    cursor.execute("DELETE FROM usage_rollup_hour WHERE window_start >= ? AND window_start < ?",
                   (first_hour, end))
    for (window_start, model, instance), rows in sorted(hours.items()):
        ttfts = [row[6] for row in rows if row[7] < 400 and row[6]]
        cursor.execute(
            "INSERT INTO usage_rollup_hour (window_start, model, in_tokens, out_tokens, dirty_s,"
            " stream_s, count, p50_ttft, p90_ttft, p99_ttft, instance) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (window_start, model, sum(r[2] for r in rows), sum(r[3] for r in rows),
             sum(r[4] for r in rows), sum(r[5] for r in rows), len(rows),
             percentile(ttfts, 0.5), percentile(ttfts, 0.9), percentile(ttfts, 0.99),
             instance))
    first_day = math.floor(first_hour / DAY) * DAY
    end_day = math.floor((end - 1) / DAY) * DAY + DAY
    cursor.execute("DELETE FROM usage_rollup_day WHERE date >= ? AND date <= ?",
                   (day_of(first_day), day_of(end_day - 1)))
    cursor.execute("SELECT window_start, model, instance, in_tokens, out_tokens, dirty_s, "
                   "stream_s, count FROM usage_rollup_hour "
                   "WHERE window_start >= ? AND window_start < ?", (first_day, end_day))
    days: dict[tuple[str, str, str], list] = defaultdict(lambda: [0, 0, 0.0, 0.0, 0])
    for window_start, model, instance, *sums in cursor.fetchall():
        totals = days[(day_of(window_start), model, instance)]
        for i, value in enumerate(sums):
            totals[i] += value
    cursor.executemany(
        "INSERT INTO usage_rollup_day (date, model, instance, in_tokens, out_tokens, dirty_s, "
        "stream_s, count) VALUES (?,?,?,?,?,?,?,?)",
        [(date, model, instance, *totals)
         for (date, model, instance), totals in sorted(days.items())])
    return {"hours": len({key[:2] for key in hours}), "days": len({key[:2] for key in days})}


def roll_for_team(cursor, since: float, now: float, retention_days: float, interval_s: float,
                  must: bool) -> dict | None:
    """A shared store's rollup tick: :func:`roll` and :func:`trim` by one daemon for the team.
    None when skipped: another daemon's tick holds :data:`ROLLER_LOCK` now, or one rolled less
    than ``interval_s`` ago — unless this daemon ``must`` (it has samples from before the last
    hour to re-roll: recovered ones)."""
    cursor.execute("SELECT pg_try_advisory_xact_lock(?)", (ROLLER_LOCK,))
    if not cursor.fetchone()[0]:
        return None
    cursor.execute("SELECT rolled_at FROM rollup_state WHERE id = 1")
    row = cursor.fetchone()
    if not must and row is not None and now - row[0] < interval_s * 0.9:
        return None
    done = roll(cursor, since, now)
    trim(cursor, now, retention_days)
    cursor.execute("INSERT INTO rollup_state (id, rolled_at) VALUES (1, ?) ON CONFLICT (id) "
                   "DO UPDATE SET rolled_at = excluded.rolled_at", (now,))
    return done


def roll_span(cursor, first: float, last: float) -> dict:
    """Roll up every hour from ``first`` to ``last`` however far apart (``roll`` only goes a
    week back from its ``now``): in steps of six days, skipping spans with no samples."""
    totals = {"hours": 0, "days": 0}
    step = SAMPLE_TTL_S - DAY
    start = first
    while start <= last:
        cursor.execute("SELECT min(ts) FROM usage_sample WHERE ts >= ? AND ts <= ? "
                       "AND op = 'messages'", (start, last))
        start = cursor.fetchone()[0]
        if start is None:
            break
        done = roll(cursor, start, min(start + step, last))
        totals["hours"] += done["hours"]
        totals["days"] += done["days"]
        start = math.floor(min(start + step, last) / HOUR) * HOUR + HOUR
    return totals


def trim(cursor, now: float, retention_days: float) -> int:
    """Drop samples older than a week and rollups older than ``retention_days``."""
    cursor.execute("DELETE FROM usage_sample WHERE ts < ?", (now - SAMPLE_TTL_S,))
    removed = cursor.rowcount
    horizon = now - retention_days * DAY
    cursor.execute("DELETE FROM usage_rollup_hour WHERE window_start < ?", (horizon,))
    cursor.execute("DELETE FROM usage_rollup_day WHERE date < ?", (day_of(horizon),))
    return removed


def rollup_entry(window_start: float, in_tokens, out_tokens, dirty_s, stream_s, count,
                 p50=None, p90=None, p99=None) -> dict:
    """One element of ``/v1/usage/rollups`` (and of ``ccp-agg``'s files)."""
    return {"window_start": window_start, "in_tokens": in_tokens, "out_tokens": out_tokens,
            "out_elr_tps": round(out_tokens / stream_s, 3) if stream_s else None,
            "out_dirty_tps": round(out_tokens / dirty_s, 3) if dirty_s else None,
            "count": count, "dirty_s": round(dirty_s, 6), "stream_s": round(stream_s, 6),
            "p50_ttft": p50, "p90_ttft": p90, "p99_ttft": p99}


def query_rollups(cursor, granularity: str, model: str | None, since: float,
                  instance: str = TEAM) -> dict:
    """``{model: [entry, ...]}`` of hour or day rollups from ``since`` on, oldest first: of
    the whole store (:data:`TEAM`) or of one instance."""
    if granularity == "hour":
        sql = ("SELECT model, window_start, in_tokens, out_tokens, dirty_s, stream_s, count, "
               "p50_ttft, p90_ttft, p99_ttft FROM usage_rollup_hour "
               "WHERE window_start >= ? AND instance = ?")
        args: list = [since, instance]
    else:
        sql = ("SELECT model, date, in_tokens, out_tokens, dirty_s, stream_s, count "
               "FROM usage_rollup_day WHERE date >= ? AND instance = ?")
        args = [day_of(since), instance]
    if model:
        sql += " AND model = ?"
        args.append(model)
    cursor.execute(sql + " ORDER BY 2, 1", args)
    models: dict[str, list] = defaultdict(list)
    for name, window, *values in cursor.fetchall():
        if granularity == "day":
            window = datetime.strptime(window, "%Y-%m-%d").replace(
                tzinfo=timezone.utc).timestamp()
        models[name].append(rollup_entry(window, *values))
    return dict(models)


def newest_rollup(cursor) -> float | None:
    cursor.execute("SELECT max(window_start) FROM usage_rollup_hour")
    return cursor.fetchone()[0]


def oldest_sample(cursor) -> float | None:
    cursor.execute("SELECT min(ts) FROM usage_sample")
    return cursor.fetchone()[0]


def save_cooldown(cursor, model: str, until: float) -> None:
    cursor.execute("INSERT INTO policy_cooldown (model, until) VALUES (?, ?) "
                   "ON CONFLICT(model) DO UPDATE SET until = excluded.until", (model, until))


def load_cooldowns(cursor, now: float) -> dict[str, float]:
    cursor.execute("DELETE FROM policy_cooldown WHERE until <= ?", (now,))
    cursor.execute("SELECT model, until FROM policy_cooldown")
    return dict(cursor.fetchall())


def save_reading(cursor, row: tuple) -> None:
    """One provider reading (:meth:`ccpd.evidence.Reading.to_row`), replacing the older one
    of its lane and window."""
    cursor.execute("INSERT INTO provider_reading (lane, plan_window, utilization, reset_at, status, "
                   "observed_at, source, surpassed_threshold, claim) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                   "ON CONFLICT(lane, plan_window) DO UPDATE SET utilization = excluded.utilization, "
                   "reset_at = excluded.reset_at, status = excluded.status, "
                   "observed_at = excluded.observed_at, source = excluded.source, "
                   "surpassed_threshold = excluded.surpassed_threshold, claim = excluded.claim "
                   "WHERE excluded.observed_at >= provider_reading.observed_at", row)


_READINGS = f"SELECT {_READING_COLUMNS} FROM provider_reading"


def load_readings(cursor) -> list[tuple]:
    """Every stored provider reading, as :meth:`ccpd.evidence.Reading.to_row` wrote it."""
    cursor.execute(_READINGS + " ORDER BY lane, plan_window")
    return cursor.fetchall()


_HAS_TOKENS = ("op = 'messages' AND input_tokens + output_tokens + "
               "coalesce(cache_creation_input_tokens, 0) + coalesce(cache_read_input_tokens, 0) > 0")
_USAGE_COLUMNS = ("coalesce(upstream_model, served_model, model), ts, input_tokens, "
                  "output_tokens, coalesce(cache_creation_input_tokens, 0), "
                  "coalesce(cache_read_input_tokens, 0), dirty_s, lane, instance")
_USAGE = f"SELECT {_USAGE_COLUMNS} FROM usage_sample WHERE {_HAS_TOKENS}"


def recent_usage(cursor, since: float, upto_seq: int | None = None) -> list[tuple]:
    """``(model, ts, input, output, cache_creation, cache_read, dirty_s, lane, instance)`` of the
    Messages samples with tokens since ``since``, oldest first: what the quota windows are
    rebuilt from (the model is the one the lane was asked for, the key live accounting uses;
    the lane is the plan that served it). On a shared store, every daemon's samples up to
    ``upto_seq`` (:func:`team_position`)."""
    if upto_seq is None:
        cursor.execute(_USAGE + " AND ts >= ? ORDER BY ts", (since,))
    else:
        cursor.execute(_USAGE + " AND ts >= ? AND seq <= ? ORDER BY ts", (since, upto_seq))
    return cursor.fetchall()


def team_position(cursor) -> int:
    """The newest ``seq`` of a shared store: every sample up to it is committed (see the
    module's note on :data:`LEDGER_LOCK`)."""
    cursor.execute("SELECT coalesce(max(seq), 0) FROM usage_sample")
    return cursor.fetchone()[0]


# One statement, so one snapshot and one round trip: the newest seq, and what came before it.
_TEAM_NEWS = (
    "WITH news AS (SELECT coalesce(max(seq), 0) AS upto FROM usage_sample) SELECT upto, "
    f"(SELECT json_agg(json_build_array({_USAGE_COLUMNS}) ORDER BY seq) FROM usage_sample "
    f"WHERE seq > ? AND seq <= upto AND instance <> ? AND {_HAS_TOKENS}), "
    "(SELECT json_agg(json_build_array(model, until)) FROM policy_cooldown WHERE until > ?), "
    f"(SELECT json_agg(json_build_array({_READING_COLUMNS})) FROM provider_reading "
    "WHERE observed_at > ?) FROM news")


def team_news(cursor, after_seq: int, instance: str, now: float,
              readings_after: float) -> tuple[int, list, dict[str, float], list]:
    """What the other daemons of a shared store recorded since this one last looked:
    ``(position, usage rows, cooldowns, readings)`` — the :func:`recent_usage` rows of the
    others' samples after ``after_seq`` up to the new position, the cooldowns still running
    at ``now`` and the provider readings observed after ``readings_after``. One statement
    (PostgreSQL only): the team ledger runs it before every decision."""
    cursor.execute(_TEAM_NEWS, (after_seq, instance, now, readings_after))
    position, rows, cooldowns, readings = cursor.fetchone()  # JSON arrays, or NULL for none
    return (position, [tuple(row) for row in rows or ()], dict(cooldowns or ()),
            [tuple(row) for row in readings or ()])


team_news.needs_transaction = False


def database_size(cursor) -> int:
    """Bytes on disk of a PostgreSQL store's database."""
    cursor.execute("SELECT pg_database_size(current_database())")
    return cursor.fetchone()[0]


def status(cursor) -> dict:
    """What ``ccp db status`` shows, besides the file's path and size."""
    counts = {}
    for table in ("usage_sample", "usage_rollup_hour", "usage_rollup_day"):
        cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed table names
        counts[table] = cursor.fetchone()[0]
    cursor.execute("SELECT max(ts) FROM usage_sample")
    newest = cursor.fetchone()[0]
    cursor.execute("SELECT max(version) FROM schema_version")
    return {"rows": counts, "newest_sample_ts": newest, "schema_version": cursor.fetchone()[0],
            "checked_at": time.time()}

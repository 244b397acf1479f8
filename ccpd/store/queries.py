"""The store's transaction functions: each takes a DB-API cursor (``sqlite3``), so the daemon
runs them through adbapi and tests and the ``ccp db`` commands on a plain connection.
"""
from __future__ import annotations

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
    "upstream_model")
_INSERT_SAMPLE = (f"INSERT OR IGNORE INTO usage_sample ({', '.join(SAMPLE_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(SAMPLE_COLUMNS))})")


def sample_row(record: dict) -> tuple:
    """The ``usage_sample`` row of one ``usage.jsonl`` record."""
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
        record.get("cache_read_input_tokens", 0), record.get("upstream_model"))


# keys only a ``ccp db export --jsonl`` row has, and only a usage.jsonl record has
_EXPORT_ONLY_KEYS = ("dirty_s", "decision")
_RECORD_ONLY_KEYS = ("dirty_ms", "reroute_decision")


def sample_row_of(line) -> tuple | None:
    """The row of one parsed JSONL line — a ``usage.jsonl`` record or a row of
    ``ccp db export --jsonl`` — or None when it is not a sample (no ``ts``/``rid``, badly
    typed values)."""
    if not isinstance(line, dict):
        return None
    ts, rid = line.get("ts"), line.get("rid")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) \
            or not isinstance(rid, str) or not rid:
        return None
    exported = (any(k in line for k in _EXPORT_ONLY_KEYS)
                and not any(k in line for k in _RECORD_ONLY_KEYS))
    try:
        return tuple(line.get(c) for c in SAMPLE_COLUMNS) if exported else sample_row(line)
    except (TypeError, ValueError, KeyError):  # e.g. "dirty_ms": "slow"
        return None


def insert_samples(cursor, rows: list[tuple]) -> int:
    """Insert rows, ignoring those already stored (same ``(ts, rid)``); how many were new."""
    before = cursor.connection.total_changes
    cursor.executemany(_INSERT_SAMPLE, rows)
    return cursor.connection.total_changes - before


def query_samples(cursor, since: float, model: str | None, limit: int) -> list[dict]:
    """Samples from ``since`` on, oldest first, at most ``limit``."""
    sql = f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM usage_sample WHERE ts >= ?"
    args: list = [since]
    if model:
        sql += " AND model = ?"
        args.append(model)
    cursor.execute(sql + " ORDER BY ts, rid LIMIT ?", (*args, limit))
    return [dict(zip(SAMPLE_COLUMNS, row)) for row in cursor.fetchall()]


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def roll(cursor, since: float, now: float) -> dict:
    """Recompute the hour rollups of every hour from ``since``'s to ``now``'s, then the day
    rollups of the days those hours are in; rollups outside that span are left alone.
    Rerunning over the same window changes nothing. Only Messages requests
    (``op = 'messages'``) are rolled up."""
    # never recompute hours whose samples the sample TTL may already have trimmed
    first_hour = math.floor(max(since, now - SAMPLE_TTL_S + HOUR) / HOUR) * HOUR
    end = math.floor(now / HOUR) * HOUR + HOUR  # the end of now's hour
    # coalesce: rows imported from elsewhere may lack a value; one NULL must not stop rollups
    cursor.execute("SELECT model, ts, coalesce(input_tokens, 0), coalesce(output_tokens, 0), "
                   "coalesce(dirty_s, 0), coalesce(stream_s, 0), coalesce(ttft_ms, 0), "
                   "coalesce(status, 0) FROM usage_sample "
                   "WHERE ts >= ? AND ts < ? AND op = 'messages'", (first_hour, end))
    hours: dict[tuple[float, str], list] = defaultdict(list)
    for row in cursor.fetchall():
        hours[(math.floor(row[1] / HOUR) * HOUR, row[0])].append(row)
    cursor.execute("DELETE FROM usage_rollup_hour WHERE window_start >= ? AND window_start < ?",
                   (first_hour, end))
    for (window_start, model), rows in sorted(hours.items()):
        ttfts = [row[6] for row in rows if row[7] < 400 and row[6]]
        cursor.execute(
            "INSERT INTO usage_rollup_hour (window_start, model, in_tokens, out_tokens, dirty_s,"
            " stream_s, count, p50_ttft, p90_ttft, p99_ttft) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (window_start, model, sum(r[2] for r in rows), sum(r[3] for r in rows),
             sum(r[4] for r in rows), sum(r[5] for r in rows), len(rows),
             percentile(ttfts, 0.5), percentile(ttfts, 0.9), percentile(ttfts, 0.99)))
    first_day = math.floor(first_hour / DAY) * DAY
    end_day = math.floor((end - 1) / DAY) * DAY + DAY
    cursor.execute("DELETE FROM usage_rollup_day WHERE date >= ? AND date <= ?",
                   (day_of(first_day), day_of(end_day - 1)))
    cursor.execute("SELECT window_start, model, in_tokens, out_tokens, dirty_s, stream_s, count "
                   "FROM usage_rollup_hour WHERE window_start >= ? AND window_start < ?",
                   (first_day, end_day))
    days: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0, 0.0, 0])
    for window_start, model, *sums in cursor.fetchall():
        totals = days[(day_of(window_start), model)]
        for i, value in enumerate(sums):
            totals[i] += value
    cursor.executemany(
        "INSERT INTO usage_rollup_day (date, model, in_tokens, out_tokens, dirty_s, stream_s, "
        "count) VALUES (?,?,?,?,?,?,?)",
        [(date, model, *totals) for (date, model), totals in sorted(days.items())])
    return {"hours": len(hours), "days": len(days)}


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


def query_rollups(cursor, granularity: str, model: str | None, since: float) -> dict:
    """``{model: [entry, ...]}`` of hour or day rollups from ``since`` on, oldest first."""
    if granularity == "hour":
        sql = ("SELECT model, window_start, in_tokens, out_tokens, dirty_s, stream_s, count, "
               "p50_ttft, p90_ttft, p99_ttft FROM usage_rollup_hour WHERE window_start >= ?")
        args: list = [since]
    else:
        sql = ("SELECT model, date, in_tokens, out_tokens, dirty_s, stream_s, count "
               "FROM usage_rollup_day WHERE date >= ?")
        args = [day_of(since)]
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


def load_readings(cursor) -> list[tuple]:
    """Every stored provider reading, as :meth:`ccpd.evidence.Reading.to_row` wrote it."""
    cursor.execute("SELECT lane, plan_window, utilization, reset_at, status, observed_at, "
                   "source, surpassed_threshold, claim FROM provider_reading "
                   "ORDER BY lane, plan_window")
    return cursor.fetchall()


def recent_usage(cursor, since: float) -> list[tuple]:
    """``(model, ts, input, output, cache_creation, cache_read, dirty_s, lane)`` of the
    Messages samples with tokens since ``since``, oldest first: what the quota windows are
    rebuilt from (the model is the one the lane was asked for, the key live accounting uses;
    the lane is the plan that served it)."""
    cursor.execute("SELECT coalesce(upstream_model, served_model, model), ts, input_tokens, "
                   "output_tokens, coalesce(cache_creation_input_tokens, 0), "
                   "coalesce(cache_read_input_tokens, 0), dirty_s, lane FROM usage_sample "
                   "WHERE ts >= ? AND op = 'messages' AND input_tokens + output_tokens + "
                   "coalesce(cache_creation_input_tokens, 0) + "
                   "coalesce(cache_read_input_tokens, 0) > 0 ORDER BY ts", (since,))
    return cursor.fetchall()


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

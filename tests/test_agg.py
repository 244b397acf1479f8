"""``ccp-agg``: merging stores and JSONL exports into rollup_hour.json and rollup_day.json."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ccpd import agg
from ccpd.quotas import percentile
from ccpd.store import queries
from ccpd.store.schema import migrate

HOUR = 3600.0
DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC, an hour boundary
CCP_AGG = Path(sys.executable).with_name("ccp-agg")


def record(ts, rid, model="glm-4.6", **fields) -> dict:
    """A usage.jsonl-like record."""
    return {"ts": ts, "rid": rid, "model": model, "lane": "zai", "op": "messages",
            "input_tokens": 100, "output_tokens": 50, "dirty_ms": 2000, "stream_ms": 1000,
            "ttft_ms": 300, "status": 200, "reroute_decision": "preferred", **fields}


def make_store(path, records, upto=None) -> Path:
    connection = sqlite3.connect(path)
    cursor = connection.cursor()
    if upto is None:
        migrate(cursor)
        queries.insert_samples(cursor, [queries.sample_row(r) for r in records])
    else:
        migrate(cursor, upto=upto)
        columns = [row[1] for row in cursor.execute("PRAGMA table_info(usage_sample)")]
        rows = [dict(zip(queries.SAMPLE_COLUMNS, queries.sample_row(r))) for r in records]
        cursor.executemany(
            f"INSERT INTO usage_sample ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})",
            [tuple(row[c] for c in columns) for row in rows])
    connection.commit()
    connection.close()
    return Path(path)


def export_jsonl(path, records) -> Path:
    """What ``ccp db export --jsonl`` writes: one object with the SAMPLE_COLUMNS keys a row."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(dict(zip(queries.SAMPLE_COLUMNS, queries.sample_row(r)))) + "\n")
    return Path(path)


def run(*dirs, out) -> int:
    argv = [arg for d in dirs for arg in ("--in", str(d))] + ["--out", str(out)]
    return agg.main(argv)


def load(out, granularity) -> dict:
    return json.loads((Path(out) / f"rollup_{granularity}.json").read_text())


def expected_hours(records) -> dict:
    """The hour rollups of ``records``, computed here independently of ``roll``."""
    groups = defaultdict(list)
    for r in records:
        if r.get("op", "messages") == "messages":
            groups[(r["model"], (r["ts"] // HOUR) * HOUR)].append(r)
    models = defaultdict(list)
    for (model, window), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ttfts = [r["ttft_ms"] for r in rows if r["status"] < 400 and r["ttft_ms"] > 0]
        out_tokens = sum(r["output_tokens"] for r in rows)
        dirty = sum(r["dirty_ms"] for r in rows) / 1000
        stream = sum(r["stream_ms"] for r in rows) / 1000
        models[model].append({
            "window_start": window, "count": len(rows),
            "in_tokens": sum(r["input_tokens"] for r in rows), "out_tokens": out_tokens,
            "dirty_s": dirty, "stream_s": stream,
            "out_elr_tps": round(out_tokens / stream, 3) if stream else None,
            "out_dirty_tps": round(out_tokens / dirty, 3) if dirty else None,
            "p50_ttft": percentile(ttfts, 0.5), "p90_ttft": percentile(ttfts, 0.9),
            "p99_ttft": percentile(ttfts, 0.99)})
    return dict(models)


def expected_days(records) -> dict:
    groups = defaultdict(list)
    for r in records:
        if r.get("op", "messages") == "messages":
            midnight = datetime.fromtimestamp(r["ts"], timezone.utc).replace(
                hour=0, minute=0, second=0, microsecond=0).timestamp()
            groups[(r["model"], midnight)].append(r)
    models = defaultdict(list)
    for (model, window), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        models[model].append({"window_start": window, "count": len(rows),
                              "in_tokens": sum(r["input_tokens"] for r in rows),
                              "out_tokens": sum(r["output_tokens"] for r in rows),
                              "dirty_s": sum(r["dirty_ms"] for r in rows) / 1000,
                              "stream_s": sum(r["stream_ms"] for r in rows) / 1000})
    return dict(models)


def assert_matches(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for model, rows in expected.items():
        assert len(actual[model]) == len(rows), model
        for got, want in zip(actual[model], rows):
            for key, value in want.items():
                assert got[key] == pytest.approx(value), (model, want["window_start"], key)


# two stores sharing hours and models, each with its own too
STORE_A = [
    record(T0 + 10, "a1", input_tokens=120, output_tokens=60, ttft_ms=200),
    record(T0 + 20, "a2", input_tokens=80, output_tokens=40, ttft_ms=900, dirty_ms=1500),
    record(T0 + 30, "a3", model="kimi-k2", ttft_ms=150, stream_ms=2500),
    record(T0 + HOUR + 5, "a4", ttft_ms=500, status=500),  # counted, not in the TTFT
    record(T0 + 40, "a5", op="count_tokens", input_tokens=999),  # not rolled up at all
    record(T0 + DAY + 7, "a6", ttft_ms=410),
]
STORE_B = [
    record(T0 + 50, "b1", input_tokens=300, output_tokens=10, ttft_ms=100, stream_ms=0),
    record(T0 + 60, "b2", ttft_ms=700),
    record(T0 + HOUR + 9, "b3", model="kimi-k2", ttft_ms=250, dirty_ms=4000),
    record(T0 + HOUR + 10, "b4", ttft_ms=320),
    record(T0 + 2 * DAY + 1, "b5", model="kimi-k2", ttft_ms=0),  # no TTFT: p50 is null
]


def test_two_stores_merge_to_the_sums_and_percentiles_of_their_union(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_store(inputs / "a.sqlite3", STORE_A)
    make_store(inputs / "b.sqlite3", STORE_B)
    out = tmp_path / "out" / "rollups"  # created, parents too

    assert run(inputs, out=out) == 0

    hour, day = load(out, "hour"), load(out, "day")
    union = STORE_A + STORE_B
    assert_matches(hour["models"], expected_hours(union))
    assert_matches(day["models"], expected_days(union))
    # the shared hour really merged both stores: 2 + 2 glm samples, TTFT over all four
    first = hour["models"]["glm-4.6"][0]
    assert first["window_start"] == T0
    assert first["count"] == 4
    assert first["in_tokens"] == 120 + 80 + 300 + 100
    assert first["p50_ttft"] == pytest.approx(percentile([200, 900, 100, 700], 0.5)) == 450
    assert first["p90_ttft"] == pytest.approx(840.0)  # 700 + 0.7 * (900 - 700)
    # the 500 counts in the hour but not in its TTFT
    second = hour["models"]["glm-4.6"][1]
    assert (second["count"], second["p50_ttft"]) == (2, 320)
    assert hour["models"]["kimi-k2"][-1]["p50_ttft"] is None
    # the endpoint's entry shape, and the file header
    assert set(first) == set(queries.rollup_entry(0, 0, 0, 0, 0, 0))
    assert hour["granularity"] == "hour" and day["granularity"] == "day"
    assert hour["sources"] == day["sources"] == ["a.sqlite3", "b.sqlite3"]
    assert hour["samples"] == day["samples"] == len(union)
    assert "ts" not in hour
    # the day sums are the sums of both stores' own day rollups
    own = defaultdict(int)
    for records in (STORE_A, STORE_B):
        for model, rows in expected_days(records).items():
            for row in rows:
                own[(model, row["window_start"])] += row["count"]
    merged = {(m, row["window_start"]): row["count"]
              for m, rows in day["models"].items() for row in rows}
    assert merged == dict(own)
    hour_rows = sum(len(rows) for rows in hour["models"].values())
    day_rows = sum(len(rows) for rows in day["models"].values())
    assert capsys.readouterr().out.strip() == (
        f"merged {len(union)} samples from 2 files into {out / 'rollup_hour.json'} "
        f"({hour_rows} hour rows) and rollup_day.json ({day_rows} day rows)")


def test_the_merge_matches_the_daemons_own_rollups_of_one_store(tmp_path):
    """Merging two stores gives what one store holding all the samples rolls up itself."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_store(inputs / "a.sqlite3", STORE_A)
    make_store(inputs / "b.sqlite3", STORE_B)
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    migrate(cursor)
    queries.insert_samples(cursor, [queries.sample_row(r) for r in STORE_A + STORE_B])
    queries.roll(cursor, T0, T0 + 3 * DAY)

    assert run(inputs, out=tmp_path / "out") == 0

    assert load(tmp_path / "out", "hour")["models"] == queries.query_rollups(
        cursor, "hour", None, 0)
    assert load(tmp_path / "out", "day")["models"] == queries.query_rollups(
        cursor, "day", None, 0)


def test_a_sample_in_a_store_and_in_its_exports_counts_once(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_store(inputs / "a.sqlite3", STORE_A)
    export_jsonl(inputs / "a-export.jsonl", STORE_A)  # the same samples again
    extra = record(T0 + 70, "c1", input_tokens=7)
    with open(inputs / "usage.jsonl", "w") as f:  # a daemon log: a4 again, and one new sample
        for r in (STORE_A[3], extra):
            f.write(json.dumps(r) + "\n")

    assert run(inputs, out=tmp_path / "out") == 0

    hour = load(tmp_path / "out", "hour")
    assert hour["samples"] == len(STORE_A) + 1
    assert hour["sources"] == ["a-export.jsonl", "a.sqlite3", "usage.jsonl"]
    assert_matches(hour["models"], expected_hours(STORE_A + [extra]))
    assert_matches(load(tmp_path / "out", "day")["models"], expected_days(STORE_A + [extra]))


def test_jsonl_exports_alone_and_a_torn_last_line(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    export = export_jsonl(inputs / "b.jsonl", STORE_B)
    with open(export, "a") as f:
        f.write('{"ts": 1800000099.0, "rid": "torn", "mod')  # a crash mid-write
    with open(inputs / "log.jsonl", "w") as f:
        f.write(json.dumps(STORE_A[0]) + "\n")
        f.write("not json\n")  # damage inside the file: skipped with a warning
        f.write(json.dumps({"event": "no ts"}) + "\n")
        f.write(json.dumps(STORE_A[1]))  # whole, only the final newline missing

    assert run(inputs, out=tmp_path / "out") == 0

    hour = load(tmp_path / "out", "hour")
    assert hour["samples"] == len(STORE_B) + 2
    assert_matches(hour["models"], expected_hours(STORE_B + STORE_A[:2]))
    err = capsys.readouterr().err
    assert "log.jsonl: skipped 2 line(s)" in err and "line 2" in err
    assert "b.jsonl" not in err


def test_a_second_run_is_byte_identical_whatever_the_order_of_the_inputs(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    make_store(one / "a.sqlite3", STORE_A)
    make_store(two / "b.sqlite3", STORE_B)
    export_jsonl(two / "b.jsonl", STORE_B)
    out = tmp_path / "out"

    assert run(one, two, out=out) == 0
    first = {name: (out / name).read_bytes() for name in ("rollup_hour.json", "rollup_day.json")}
    assert run(one, two, out=out) == 0
    assert {name: (out / name).read_bytes() for name in first} == first
    assert run(two, one, out=tmp_path / "swapped") == 0
    assert {name: (tmp_path / "swapped" / name).read_bytes() for name in first} == first
    # the layout: sorted keys, two-space indent, one trailing newline, nothing else in out
    text = first["rollup_hour.json"].decode()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(first)


def test_samples_weeks_apart_are_all_aggregated(tmp_path):
    spread = [record(T0 - 60 * DAY, "old", ttft_ms=111),
              record(T0, "w0"),
              record(T0 + 6 * DAY + 30 * 60, "w1"),  # right at a roll-window edge
              record(T0 + 10 * DAY + 5, "w2"),
              record(T0 + 10 * DAY + 6, "w3", model="kimi-k2"),
              record(T0 + 45 * DAY, "new", ttft_ms=999)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_store(inputs / "s.sqlite3", spread[:3])
    export_jsonl(inputs / "later.jsonl", spread[3:])

    assert run(inputs, out=tmp_path / "out") == 0

    hour, day = load(tmp_path / "out", "hour"), load(tmp_path / "out", "day")
    assert_matches(hour["models"], expected_hours(spread))
    assert_matches(day["models"], expected_days(spread))
    assert [row["window_start"] for row in hour["models"]["glm-4.6"]] == [
        T0 - 60 * DAY, T0, T0 + 6 * DAY, T0 + 10 * DAY, T0 + 45 * DAY]
    assert sum(row["count"] for rows in day["models"].values() for row in rows) == len(spread)


def test_a_version_1_store_is_read(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_store(inputs / "old.sqlite3", STORE_A, upto=1)
    columns = [row[1] for row in sqlite3.connect(inputs / "old.sqlite3").execute(
        "PRAGMA table_info(usage_sample)")]
    assert "served_model" not in columns  # really the version-1 table

    assert run(inputs, out=tmp_path / "out") == 0

    assert_matches(load(tmp_path / "out", "hour")["models"], expected_hours(STORE_A))
    assert load(tmp_path / "out", "hour")["samples"] == len(STORE_A)
    connection = sqlite3.connect(inputs / "old.sqlite3")
    assert connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
    connection.close()


def test_a_live_wal_store_is_read_and_left_untouched(tmp_path):
    """The daemon's store is in WAL mode and open while ``ccp-agg`` reads it: the samples still
    in the WAL are seen, and neither the store nor its WAL is written to."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    store = make_store(inputs / "live.sqlite3", STORE_A[:3])
    daemon = sqlite3.connect(store)
    daemon.execute("PRAGMA journal_mode=WAL")
    daemon.execute("PRAGMA wal_autocheckpoint=0")
    queries.insert_samples(daemon.cursor(), [queries.sample_row(r) for r in STORE_A[3:]])
    daemon.commit()  # committed, in the WAL, not checkpointed
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    try:
        assert run(inputs, out=tmp_path / "out") == 0
        after = {p.name: p.read_bytes() for p in inputs.iterdir()}
    finally:
        daemon.close()

    assert load(tmp_path / "out", "hour")["samples"] == len(STORE_A)
    assert_matches(load(tmp_path / "out", "hour")["models"], expected_hours(STORE_A))
    assert after["live.sqlite3"] == before["live.sqlite3"]
    assert after["live.sqlite3-wal"] == before["live.sqlite3-wal"]


def test_a_store_is_opened_read_only(tmp_path):
    """A store copied with its WAL (a crashed daemon's files): a writable connection would
    checkpoint the WAL into the store and delete it on close; a read-only one changes nothing."""
    source = tmp_path / "daemon"
    source.mkdir()
    daemon = sqlite3.connect(make_store(source / "crashed.sqlite3", STORE_A[:2]))
    daemon.execute("PRAGMA journal_mode=WAL")
    daemon.execute("PRAGMA wal_autocheckpoint=0")
    queries.insert_samples(daemon.cursor(), [queries.sample_row(r) for r in STORE_A[2:]])
    daemon.commit()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in source.iterdir():
        (inputs / path.name).write_bytes(path.read_bytes())
    daemon.close()
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    assert "crashed.sqlite3-wal" in before

    assert run(inputs, out=tmp_path / "out") == 0

    assert load(tmp_path / "out", "hour")["samples"] == len(STORE_A)
    after = {p.name: p.read_bytes() for p in inputs.iterdir()}
    assert sorted(after) == sorted(before)  # the WAL was not checkpointed away
    # (the -shm wal-index is shared memory every reader may touch)
    for name in ("crashed.sqlite3", "crashed.sqlite3-wal"):
        assert after[name] == before[name], name


@pytest.mark.parametrize("setup, named", [
    ("empty", "in"),
    ("missing", "nope"),
    ("corrupt", "broken.sqlite3"),
    ("no-table", "other.sqlite3"),
])
def test_errors_name_the_problem_and_exit_2(tmp_path, capsys, setup, named):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if setup == "missing":
        inputs = tmp_path / "nope"
    elif setup == "corrupt":
        make_store(inputs / "good.sqlite3", STORE_A)
        (inputs / "broken.sqlite3").write_bytes(b"this is not a database, just text" * 100)
    elif setup == "no-table":
        sqlite3.connect(inputs / "other.sqlite3").execute("CREATE TABLE t (x)").connection.close()
    out = tmp_path / "out"

    assert run(inputs, out=out) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ccp-agg: ") and named in captured.err
    assert "Traceback" not in captured.err and len(captured.err.splitlines()) == 1
    assert not out.exists()


# -- a team's PostgreSQL store (tests/pg.py) ------------------------------------------------------

PASSWORD = "s3cret-Pw"


def team_store(dsn: str, samples: list[tuple]) -> None:
    """A migrated team database holding ``samples`` (``sample_row``s of their instances)."""
    import psycopg

    from ccpd.store.queries import PostgresCursor
    from ccpd.store.schema import LATEST, POSTGRESQL
    with psycopg.connect(dsn) as connection:
        cursor = PostgresCursor(connection.cursor())
        migrate(cursor, LATEST, POSTGRESQL)
        queries.insert_samples(cursor, samples)


def test_a_team_database_merges_with_a_workstations_files(tmp_path, postgres, capsys):
    team_store(postgres.dsn, [queries.sample_row(r, "alice") for r in STORE_A]
               + [queries.sample_row(r, "bob") for r in STORE_B[:3]])
    inputs = tmp_path / "laptop"
    inputs.mkdir()
    export_jsonl(inputs / "laptop.jsonl", STORE_B[2:])  # b3 is in the team's store too
    url = postgres.dsn.replace("postgresql://ccpd@", f"postgresql://ccpd:{PASSWORD}@")
    out = tmp_path / "out"

    assert agg.main(["--in", url, "--in", str(inputs), "--out", str(out)]) == 0

    union = STORE_A + STORE_B
    hour, day = load(out, "hour"), load(out, "day")
    assert hour["samples"] == day["samples"] == len(union)  # b3 counted once
    assert hour["sources"] == ["laptop.jsonl", postgres.dsn]  # the URL without its password
    assert_matches(hour["models"], expected_hours(union))
    assert_matches(day["models"], expected_days(union))
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"merged {len(union)} samples from 2 files into ")
    assert PASSWORD not in captured.out + (out / "rollup_hour.json").read_text() \
        + (out / "rollup_day.json").read_text()


def test_a_database_that_cannot_be_read_is_one_line_without_the_password(tmp_path, postgres,
                                                                         capsys):
    from tests.support import free_port
    port = free_port()
    unreachable = f"postgresql://ccpd:{PASSWORD}@127.0.0.1:{port}/team"
    empty = postgres.dsn.replace("postgresql://ccpd@", f"postgresql://ccpd:{PASSWORD}@")
    for url, message in ((unreachable, f"postgresql://ccpd@127.0.0.1:{port}/team: connection "
                                       "failed: connection to server at \"127.0.0.1\", port "
                                       f"{port} failed: Connection refused"),
                         (empty, f"{postgres.dsn}: no usage_sample table (not a ccpd store?)")):
        out = tmp_path / "out"

        assert agg.main(["--in", url, "--out", str(out)]) == 2

        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"ccp-agg: {message}\n")
        assert not out.exists()

    assert agg.main(["--in", f"mysql://ccpd:{PASSWORD}@db/team", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("ccp-agg: --in: a URL must be a "
                                       "postgresql://user[:password]@host[:port]/database URL\n")


def test_the_console_script(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_store(inputs / "a.sqlite3", STORE_A)
    make_store(inputs / "b.sqlite3", STORE_B)

    done = subprocess.run([str(CCP_AGG), "--in", str(inputs), "--out", "rollups"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"merged {len(STORE_A + STORE_B)} samples from 2 files into "
                                  "rollups/rollup_hour.json (")
    assert_matches(load(tmp_path / "rollups", "hour")["models"], expected_hours(STORE_A + STORE_B))

    (inputs / "zz.sqlite3").write_bytes(b"\x00garbage" * 200)
    failed = subprocess.run([str(CCP_AGG), "--in", str(inputs), "--out", "rollups"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2
    assert "zz.sqlite3" in failed.stderr and "Traceback" not in failed.stderr

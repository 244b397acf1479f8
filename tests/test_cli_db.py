"""``ccp db status|export|import`` on store files in ``tmp_path`` (plain sqlite3, no reactor)."""
from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccpd.cli import main
from ccpd.store.queries import SAMPLE_COLUMNS
from ccpd.store.schema import LATEST

CCP = Path(sys.executable).with_name("ccp")
NOW = time.time()


def record(i: int, model: str = "claude-sonnet-4-5", **extra) -> dict:
    """A usage.jsonl line as ccpd writes it (docs/System/contracts/USAGE_EVENT_SCHEMA.md)."""
    base = {
        "ts": NOW - 3630 + i * 60, "rid": f"{i:032x}", "model": model, "served_model": model,
        "lane": "anthropic", "op": "messages", "stream": i % 2 == 0, "status": 200,
        "input_tokens": 100 + i, "output_tokens": 10 + i, "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 300, "ttft_ms": 400 + i, "stream_ms": 2000, "dirty_ms": 2500,
        "err_type": None, "upstream": "https://api.anthropic.com", "reroute_mode": "hybrid",
        "reroute_decision": "preferred", "decision_reason": "", "reroute_attempt": 0,
        "warn_pct_auto": None, "gap_seconds_p50": None, "gap_seconds_p95": None,
        "gap_samples": 0, "header_mode": "passthrough",
    }
    base.update(extra)
    return base


RECORDS = [record(0), record(1), record(2, model="glm-4.6", lane="zai"),
           record(3, status=429, err_type="rate_limit_error"), record(4, model="glm-4.6")]
# the hour and day rollup rows RECORDS make (they span 4 minutes: one or two hours and days)
HOUR_ROWS = len({(int(r["ts"] // 3600), r["model"]) for r in RECORDS})
DAY_ROWS = len({(int(r["ts"] // 86400), r["model"]) for r in RECORDS})


@pytest.fixture
def usage_log(tmp_path) -> Path:
    """Five records, a line that is JSON but no object, one without a rid, and a torn last
    line (as a crash mid-write leaves it)."""
    path = tmp_path / "usage.jsonl"
    lines = [json.dumps(r) for r in RECORDS[:3]]
    lines += ["[1, 2, 3]", json.dumps({"ts": NOW, "model": "x"}), ""]
    lines += [json.dumps(r) for r in RECORDS[3:]]
    path.write_text("\n".join(lines) + "\n" + json.dumps(record(9))[:40])
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def db_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM usage_sample ORDER BY ts, rid").fetchall()


@pytest.fixture
def store(tmp_path, usage_log, capsys) -> Path:
    path = tmp_path / "store" / "ccp.sqlite3"
    code, out, _ = run(capsys, "db", "import", "--jsonl", str(usage_log), "--db", str(path))
    assert code == 0, out
    return path


# --------------------------------------------------------------------------- import

def test_import_counts_stores_rows_and_is_idempotent(tmp_path, usage_log, capsys):
    db = tmp_path / "new" / "ccp.sqlite3"  # the directory does not exist yet either
    code, out, err = run(capsys, "db", "import", "--jsonl", str(usage_log), "--db", str(db))
    assert (code, err) == (0, "")
    # skipped: the array and the object without rid; a torn last line (a crash mid-write) is
    # no line of the log, and a blank line no record
    assert out == "imported 5 new samples (0 already stored, 2 lines skipped; " \
                  f"{HOUR_ROWS} hour rollups recomputed)\n"
    rows = db_rows(db)
    assert [r[1] for r in rows] == [r["rid"] for r in RECORDS]
    first = dict(zip(SAMPLE_COLUMNS, rows[0]))
    assert first["model"] == "claude-sonnet-4-5" and first["input_tokens"] == 100
    assert first["dirty_s"] == pytest.approx(2.5) and first["stream_s"] == pytest.approx(2.0)
    assert first["stream"] == 1 and first["cache_read_input_tokens"] == 300
    assert dict(zip(SAMPLE_COLUMNS, rows[3]))["err_type"] == "rate_limit_error"

    code, out, _ = run(capsys, "db", "import", "--jsonl", str(usage_log), "--db", str(db))
    assert code == 0
    assert out == "imported 0 new samples (5 already stored, 2 lines skipped; " \
                  "0 hour rollups recomputed)\n"
    assert len(db_rows(db)) == 5
    # the imported history is rolled up at once (the daemon's roller only re-rolls the last hour)
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT sum(count) FROM usage_rollup_hour").fetchone()[0] == \
            sum(1 for r in RECORDS if r.get("op", "messages") == "messages")


def test_import_migrates_the_store_like_ccpd(store):
    with sqlite3.connect(store) as connection:
        assert connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] == LATEST
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_import_of_missing_file_is_a_usage_error(tmp_path, capsys):
    db = tmp_path / "ccp.sqlite3"
    code, out, err = run(capsys, "db", "import", "--jsonl", str(tmp_path / "nope.jsonl"),
                         "--db", str(db))
    assert code == 2 and out == ""
    assert err == f"ccp: {tmp_path / 'nope.jsonl'}: no such file\n"
    assert not db.exists()


def test_import_into_a_file_that_is_not_a_database_fails_cleanly(tmp_path, usage_log, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("these are not the tables you are looking for\n" * 100)
    code, out, err = run(capsys, "db", "import", "--jsonl", str(usage_log), "--db", str(bogus))
    assert code == 1 and out == ""
    assert err == f"ccp: {bogus}: file is not a database\n"


def test_import_requires_jsonl(tmp_path, capsys):
    code, _, err = run(capsys, "db", "import", "--db", str(tmp_path / "x.db"))
    assert code == 2 and "--jsonl" in err
    assert not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- export

def test_jsonl_export_round_trips_into_a_fresh_store(tmp_path, store, capsys):
    code, exported, _ = run(capsys, "db", "export", "--jsonl", "--db", str(store))
    assert code == 0
    lines = exported.splitlines()
    assert len(lines) == 5
    assert list(json.loads(lines[0])) == list(SAMPLE_COLUMNS)
    dump = tmp_path / "export.jsonl"
    dump.write_text(exported)

    fresh = tmp_path / "fresh.sqlite3"
    code, out, _ = run(capsys, "db", "import", "--jsonl", str(dump), "--db", str(fresh))
    assert code == 0
    assert out.startswith("imported 5 new samples (0 already stored, 0 lines skipped; ")
    assert db_rows(fresh) == db_rows(store)


def test_csv_export_header_rows_and_values(tmp_path, store, capsys):
    code, out, _ = run(capsys, "db", "export", "--csv", "--db", str(store))
    assert code == 0
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == list(SAMPLE_COLUMNS)
    assert len(table) == 6
    rows = [dict(zip(table[0], row)) for row in table[1:]]
    assert [r["rid"] for r in rows] == [r["rid"] for r in RECORDS]  # ordered by ts
    assert rows[2]["model"] == "glm-4.6" and rows[2]["lane"] == "zai"
    assert float(rows[0]["ts"]) == pytest.approx(RECORDS[0]["ts"])
    assert rows[0]["output_tokens"] == "10" and rows[0]["decision"] == "preferred"
    assert float(rows[0]["dirty_s"]) == 2.5
    assert rows[0]["err_type"] == ""  # NULL
    assert rows[3]["status"] == "429" and rows[3]["err_type"] == "rate_limit_error"


def test_export_to_a_file(tmp_path, store, capsys):
    target = tmp_path / "out.csv"
    code, out, err = run(capsys, "db", "export", "--csv", "--db", str(store),
                         "--out", str(target))
    assert code == 0 and out == ""
    assert err == f"exported 5 samples to {target}\n"
    assert len(list(csv.reader(target.open()))) == 6
    assert not Path(str(target) + ".part").exists()


def test_export_filters_since_and_model(store, capsys):
    since = RECORDS[2]["ts"]
    code, out, _ = run(capsys, "db", "export", "--csv", "--db", str(store),
                       "--since", repr(since))
    assert code == 0
    rids = [row[1] for row in list(csv.reader(io.StringIO(out)))[1:]]
    assert rids == [r["rid"] for r in RECORDS[2:]]

    code, out, _ = run(capsys, "db", "export", "--jsonl", "--db", str(store),
                       "--model", "glm-4.6")
    assert [json.loads(line)["rid"] for line in out.splitlines()] == \
           [RECORDS[2]["rid"], RECORDS[4]["rid"]]

    code, out, _ = run(capsys, "db", "export", "--jsonl", "--db", str(store),
                       "--model", "glm-4.6", "--since", repr(RECORDS[3]["ts"]))
    assert [json.loads(line)["rid"] for line in out.splitlines()] == [RECORDS[4]["rid"]]


def test_export_needs_exactly_one_format(store, capsys):
    code, out, err = run(capsys, "db", "export", "--db", str(store))
    assert code == 2 and out == "" and "one of the arguments --csv --jsonl is required" in err
    code, out, err = run(capsys, "db", "export", "--csv", "--jsonl", "--db", str(store))
    assert code == 2 and out == "" and "not allowed with" in err


def test_export_of_missing_store_does_not_create_it(tmp_path, capsys):
    db = tmp_path / "none.sqlite3"
    code, out, err = run(capsys, "db", "export", "--csv", "--db", str(db))
    assert code == 2 and out == ""
    assert "no store at" in err
    assert not db.exists()


# --------------------------------------------------------------------------- status

def test_status_text_after_import(store, capsys):
    code, out, err = run(capsys, "db", "status", "--db", str(store))
    assert (code, err) == (0, "")
    fields = dict(line.split("  ", 1) for line in out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["store"] == str(store)
    assert fields["size"].endswith(" KB") or " KB (+ WAL" in fields["size"]
    assert fields["schema version"] == str(LATEST)
    assert fields["samples"] == "5"
    assert fields["hour rollups"] == str(HOUR_ROWS) and fields["day rollups"] == str(DAY_ROWS)
    newest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(RECORDS[4]["ts"]))
    # 56.5 minutes before the module was imported; allow the suite half a minute
    assert fields["newest sample"] in (f"{newest} (56 minutes ago)",
                                       f"{newest} (57 minutes ago)")
    assert fields["models"] == "2"


def test_status_json(store, capsys):
    code, out, _ = run(capsys, "db", "status", "--json", "--db", str(store))
    assert code == 0
    info = json.loads(out)
    assert info["path"] == str(store)
    assert info["size_bytes"] == store.stat().st_size
    assert info["schema_version"] == LATEST
    assert info["rows"] == {"usage_sample": 5, "usage_rollup_hour": HOUR_ROWS,
                            "usage_rollup_day": DAY_ROWS}
    assert info["newest_sample_ts"] == pytest.approx(RECORDS[4]["ts"])
    assert 56.5 * 60 <= info["newest_sample_age_s"] < 58 * 60
    assert info["models"] == 2


def test_status_of_missing_store(tmp_path, capsys):
    db = tmp_path / "logs" / "ccp.sqlite3"
    code, out, err = run(capsys, "db", "status", "--db", str(db))
    assert code == 2 and out == ""
    assert err == (f"ccp: no store at {db} (ccpd creates it on start; "
                   "set --db or CCP_DB_PATH)\n")
    assert not db.exists() and not db.parent.exists()


def test_status_of_an_empty_database_says_it_is_no_store(tmp_path, capsys):
    db = tmp_path / "empty.sqlite3"
    db.touch()
    code, out, err = run(capsys, "db", "status", "--db", str(db))
    assert code == 1 and out == ""
    assert err.startswith(f"ccp: {db}: not a ccpd store")
    assert "Traceback" not in err


def test_db_option_works_before_and_after_the_subcommand(store, capsys):
    code, out, _ = run(capsys, "db", "--db", str(store), "status")
    assert code == 0 and f"store           {store}" in out


def test_db_path_from_environment(tmp_path, store, capsys, monkeypatch):
    monkeypatch.setenv("CCP_DB_PATH", str(store))
    code, out, _ = run(capsys, "db", "status", "--json")
    assert code == 0 and json.loads(out)["rows"]["usage_sample"] == 5
    # --db wins over the environment
    code, _, err = run(capsys, "db", "status", "--db", str(tmp_path / "other.sqlite3"))
    assert code == 2 and "other.sqlite3" in err


def test_default_db_path_is_logs_ccp_sqlite3(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CCP_DB_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "db", "status")
    assert code == 2 and "no store at logs/ccp.sqlite3" in err
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- progress

class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def big_log(tmp_path) -> Path:
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(6000):  # ~ 3.5 MB
            f.write(json.dumps(record(i, ts=NOW - 86400 + i)) + "\n")
    assert path.stat().st_size > 1 << 20
    return path


def test_progress_forced_ends_at_100_percent(tmp_path, usage_log, capsys):
    code, out, err = run(capsys, "db", "import", "--jsonl", str(usage_log), "--db",
                         str(tmp_path / "p.sqlite3"), "--progress")
    assert code == 0 and out.startswith("imported 5 new samples")
    assert err.endswith("\n")
    last = err.rstrip("\n").split("\r")[-1]
    assert last == f"importing {usage_log} 100% [====================] 9 lines"


def test_progress_on_a_terminal_for_big_files_only(tmp_path, monkeypatch, capsys):
    path = big_log(tmp_path)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["db", "import", "--jsonl", str(path), "--db", str(tmp_path / "a.db")]) == 0
    assert capsys.readouterr().out.startswith("imported 6,000 new samples (0 already stored, "
                                              "0 lines skipped; ")
    shown = terminal.getvalue()
    assert shown.startswith("\rimporting ") and shown.endswith("100% [====================]"
                                                               " 6,000 lines\n")
    assert shown.count("\n") == 1  # one updating line

    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(record(1)) + "\n")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["db", "import", "--jsonl", str(small), "--db", str(tmp_path / "b.db")]) == 0
    assert terminal.getvalue() == ""


def test_no_progress_when_stderr_is_not_a_terminal(tmp_path, capsys):
    path = big_log(tmp_path)
    code, out, err = run(capsys, "db", "import", "--jsonl", str(path),
                         "--db", str(tmp_path / "a.db"))
    assert code == 0 and out.startswith("imported 6,000 new samples")
    assert err == ""


# --------------------------------------------------------------------------- as installed

def test_console_script_db_status(store):
    assert CCP.exists(), f"console script not installed at {CCP}"
    env = {k: v for k, v in os.environ.items() if k != "CCP_DB_PATH"}
    done = subprocess.run([str(CCP), "db", "status", "--db", str(store)], capture_output=True,
                          text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "samples         5" in done.stdout and f"schema version  {LATEST}" in done.stdout

    missing = store.with_name("missing.sqlite3")
    done = subprocess.run([str(CCP), "db", "status", "--db", str(missing)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"ccp: no store at {missing}")
    assert not missing.exists()


def test_db_commands_run_without_twisted_or_zope(store):
    """``ccp`` is stdlib-only: the db commands must not need Twisted or zope."""
    code = ("import sys; sys.modules['zope'] = None; sys.modules['twisted'] = None\n"
            "from ccpd.cli import main\n"
            f"sys.exit(main(['db', 'status', '--json', '--db', {str(store)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"]["usage_sample"] == 5

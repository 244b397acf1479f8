"""``ccp db status|export|import`` on team mode's PostgreSQL store (a real server: tests/pg.py):
what a user sees of a team's database, which store is chosen when, and that a URL's password is
never shown, also when the database cannot be reached."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import psycopg
import pytest

from ccpd.cli import main
from ccpd.store import queries
from ccpd.store.queries import PostgresCursor
from ccpd.store.schema import LATEST, POSTGRESQL, migrate
from tests.support import free_port

NOW = time.time()
PASSWORD = "s3cret-Pw"


def sample(rid: str, age_s: float, instance: str, model: str = "glm-4.6") -> tuple:
    return queries.sample_row({"ts": NOW - age_s, "rid": rid, "model": model, "lane": "zai",
                               "op": "messages", "input_tokens": 100, "output_tokens": 10,
                               "dirty_ms": 500, "stream_ms": 400, "ttft_ms": 120,
                               "status": 200}, instance)


# alice's newest is 5 minutes old, bob's 65 minutes
SAMPLES = [sample("a1", 900, "alice"), sample("a2", 600, "alice"), sample("a3", 300, "alice"),
           sample("b1", 7200, "bob", "kimi-k2"), sample("b2", 3900, "bob")]
# the rollups of a shared store: the team's ('') and each instance's own
HOUR_ROWS = len({(math.floor(row[0] / 3600), row[2], who) for row in SAMPLES
                 for who in ("", row[-1])})
DAY_ROWS = len({(queries.day_of(row[0]), row[2], who) for row in SAMPLES
                for who in ("", row[-1])})


def with_password(dsn: str) -> str:
    """The DSN with a password (the test server trusts every login, so it is ignored)."""
    return dsn.replace("postgresql://ccpd@", f"postgresql://ccpd:{PASSWORD}@")


@pytest.fixture
def team(postgres) -> str:
    """A migrated team database holding the samples of alice and bob, rolled up."""
    with psycopg.connect(postgres.dsn) as connection:
        cursor = PostgresCursor(connection.cursor())
        migrate(cursor, LATEST, POSTGRESQL)
        queries.insert_samples(cursor, SAMPLES)
        queries.roll_span(cursor, NOW - 7200, NOW)
    return postgres.dsn


@pytest.fixture(autouse=True)
def no_store_environment(monkeypatch):
    monkeypatch.delenv("CCP_DB_URL", raising=False)
    monkeypatch.delenv("CCP_DB_PATH", raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fields_of(text: str) -> dict[str, str]:
    return {label.strip(): value.strip()
            for label, value in (line.split("  ", 1) for line in text.splitlines())}


def utc(age_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - age_s))


# --------------------------------------------------------------------------- status

def test_status_text_of_a_team_database(team, capsys):
    code, out, err = run(capsys, "db", "status", "--url", with_password(team))

    assert (code, err) == (0, "")
    assert PASSWORD not in out
    lines = out.splitlines()
    fields = fields_of(out)
    assert fields["store"] == team  # the URL without its password
    assert fields["size"].endswith(" MB")
    assert fields["schema version"] == str(LATEST)
    assert fields["samples"] == "5"
    assert (fields["hour rollups"], fields["day rollups"]) == (str(HOUR_ROWS), str(DAY_ROWS))
    # the module was imported a few seconds ago at most
    assert fields["newest sample"] in (f"{utc(300)} (5 minutes ago)",
                                       f"{utc(300)} (6 minutes ago)")
    assert fields["models"] == "2"
    assert fields["instances"] == "2"
    alice, bob = lines[-2:]
    assert alice in (f"  alice         3 samples, newest {utc(300)} (5 minutes ago)",
                     f"  alice         3 samples, newest {utc(300)} (6 minutes ago)")
    assert bob in (f"  bob           2 samples, newest {utc(3900)} (65 minutes ago)",
                   f"  bob           2 samples, newest {utc(3900)} (66 minutes ago)")


def test_status_json_of_a_team_database(team, capsys):
    code, out, err = run(capsys, "db", "status", "--json", "--url", with_password(team))

    assert (code, err) == (0, "")
    assert PASSWORD not in out
    info = json.loads(out)
    assert info["url"] == team and "path" not in info
    with psycopg.connect(team) as connection:
        size = connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    assert abs(info["size_bytes"] - size) < 1 << 20
    assert (info["schema_version"], info["schema_latest"]) == (LATEST, LATEST)
    assert info["rows"] == {"usage_sample": 5, "usage_rollup_hour": HOUR_ROWS,
                            "usage_rollup_day": DAY_ROWS}
    assert info["newest_sample_ts"] == pytest.approx(NOW - 300)
    assert info["models"] == 2
    assert sorted(info["instances"]) == ["alice", "bob"]
    bob = info["instances"]["bob"]
    assert bob["samples"] == 2 and bob["newest_sample_ts"] == pytest.approx(NOW - 3900)
    assert bob["newest_sample_utc"] == utc(3900)
    assert 3900 <= bob["newest_sample_age_s"] < 3960
    assert info["instances"]["alice"]["samples"] == 3


def test_the_store_is_chosen_as_the_daemon_chooses_it(team, tmp_path, capsys, monkeypatch):
    # $CCP_DB_URL (team mode) wins over $CCP_DB_PATH ...
    monkeypatch.setenv("CCP_DB_URL", with_password(team))
    monkeypatch.setenv("CCP_DB_PATH", str(tmp_path / "ccp.sqlite3"))
    code, out, err = run(capsys, "db", "status", "--json")
    assert (code, err) == (0, "") and json.loads(out)["url"] == team
    # ... and --db PATH wins over both
    code, out, err = run(capsys, "db", "status", "--db", str(tmp_path / "other.sqlite3"))
    assert code == 2 and out == ""
    assert err == (f"ccp: no store at {tmp_path / 'other.sqlite3'} (ccpd creates it on start; "
                   "set --db or CCP_DB_PATH)\n")
    # --url before the subcommand too
    monkeypatch.delenv("CCP_DB_URL")
    code, out, _ = run(capsys, "db", "--url", team, "status")
    assert code == 0 and fields_of(out)["store"] == team


def test_a_bad_url_is_refused_without_repeating_it(capsys, monkeypatch):
    monkeypatch.setenv("CCP_DB_URL", f"mysql://ccpd:{PASSWORD}@db.example:3306/team")
    code, out, err = run(capsys, "db", "status")
    assert (code, out) == (2, "")
    assert err == ("ccp: the store URL must be a "
                   "postgresql://user[:password]@host[:port]/database URL\n")
    code, out, err = run(capsys, "db", "status", "--db", f"mysql://ccpd:{PASSWORD}@db/team")
    assert (code, out) == (2, "") and err.startswith("ccp: the store URL must be")
    code, _, err = run(capsys, "db", "status", "--db", "a.sqlite3", "--url", "postgresql://x/y")
    assert code == 2 and "not allowed with argument" in err


def test_an_unreachable_database_is_one_line_without_the_password(capsys):
    port = free_port()
    url = f"postgresql://ccpd:{PASSWORD}@127.0.0.1:{port}/team"

    for argv in (["db", "status", "--url", url], ["db", "export", "--csv", "--url", url]):
        code, out, err = run(capsys, *argv)

        assert (code, out) == (1, "")
        assert err.startswith(f"ccp: postgresql://ccpd@127.0.0.1:{port}/team: ")
        assert "Connection refused" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert PASSWORD not in err


def test_a_database_that_is_no_ccpd_store(postgres, capsys):
    code, out, err = run(capsys, "db", "status", "--url", with_password(postgres.dsn))
    assert (code, out) == (1, "")
    assert err == (f"ccp: {postgres.dsn}: not a ccpd store (no schema_version, usage_sample, "
                   "usage_rollup_hour, usage_rollup_day table)\n")


def test_status_leaves_the_database_as_it_was(postgres, capsys):
    """Read-only: not even the schema_version table that a migration starts with appears."""
    run(capsys, "db", "status", "--url", postgres.dsn)
    with psycopg.connect(postgres.dsn) as connection:
        assert connection.execute("SELECT count(*) FROM information_schema.tables "
                                  "WHERE table_schema = 'public'").fetchone()[0] == 0


# --------------------------------------------------------------------------- export, import

def test_jsonl_export_of_a_team_database_round_trips_into_sqlite(team, tmp_path, capsys):
    code, out, err = run(capsys, "db", "export", "--jsonl", "--url", team)
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["rid"], r["instance"]) for r in rows] == [
        ("b1", "bob"), ("b2", "bob"), ("a1", "alice"), ("a2", "alice"), ("a3", "alice")]
    assert list(rows[0]) == list(queries.SAMPLE_COLUMNS)  # no seq: the columns of SQLite's

    code, out, err = run(capsys, "db", "export", "--csv", "--url", team, "--model", "kimi-k2")
    assert code == 0 and out.splitlines()[0] == ",".join(queries.SAMPLE_COLUMNS)
    assert len(out.splitlines()) == 2 and ",b1," in out

    export = tmp_path / "team.jsonl"
    assert run(capsys, "db", "export", "--jsonl", "--url", team, "--out", str(export))[0] == 0
    store = tmp_path / "copy.sqlite3"
    code, out, _ = run(capsys, "db", "import", "--jsonl", str(export), "--db", str(store))
    assert code == 0 and out.startswith("imported 5 new samples")
    code, out, _ = run(capsys, "db", "status", "--json", "--db", str(store))
    assert json.loads(out)["rows"]["usage_sample"] == 5


def test_import_into_postgresql_is_refused(team, tmp_path, capsys, monkeypatch):
    log = tmp_path / "usage.jsonl"
    log.write_text(json.dumps({"ts": NOW, "rid": "new", "model": "glm-4.6"}) + "\n")
    expected = (f"ccp: db import loads a SQLite store only, not {team} (the team's daemons fill "
                "a PostgreSQL store): give the file with --db PATH\n")

    code, out, err = run(capsys, "db", "import", "--jsonl", str(log), "--url", with_password(team))
    assert (code, out, err) == (2, "", expected)
    monkeypatch.setenv("CCP_DB_URL", with_password(team))
    code, out, err = run(capsys, "db", "import", "--jsonl", str(log))
    assert (code, out, err) == (2, "", expected)

    with psycopg.connect(team) as connection:
        assert connection.execute("SELECT count(*) FROM usage_sample").fetchone()[0] == 5


# --------------------------------------------------------------------------- without psycopg

def test_without_psycopg_sqlite_works_and_a_url_says_what_is_missing(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from ccpd.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    store = tmp_path / "ccp.sqlite3"
    log = tmp_path / "usage.jsonl"
    log.write_text(json.dumps({"ts": NOW, "rid": "r1", "model": "glm-4.6"}) + "\n")
    done = subprocess.run([sys.executable, "-c", code, "db", "import", "--jsonl", str(log),
                           "--db", str(store)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr

    done = subprocess.run([sys.executable, "-c", code, "db", "status", "--url",
                           f"postgresql://ccpd:{PASSWORD}@127.0.0.1:{free_port()}/team"],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("ccp: a PostgreSQL store needs the psycopg package: "
                           "pip install 'ccpd[postgresql]'\n")

"""``ccp-agg``: merge the usage of several stores and JSONL exports into one pair of rollup files.

``ccp-agg --in DIR|URL [--in DIR|URL ...] [--out DIR]`` reads every ``*.sqlite3`` and ``*.jsonl``
file directly inside each ``--in`` directory (not recursive) and each ``--in`` PostgreSQL URL (a
team's store, ``postgresql://user[:password]@host[:port]/database``), and writes
``<out>/rollup_hour.json`` and ``<out>/rollup_day.json`` (``--out`` defaults to
``results/rollups`` and is created). So a team's database merges with a workstation's files.

How it merges
    Rollups cannot be added up (a TTFT percentile of a union is not a function of the
    percentiles of its parts), so the merge is at the *sample* level: every input's
    ``usage_sample`` rows are loaded, de-duplicated on ``(ts, rid)`` (a sample in a store and in
    that store's export counts once; the first copy in source order — file name, then full
    path; a database's name is its URL without the password — is kept), inserted oldest
    first into an in-memory SQLite at the latest schema, and rolled up by
    :func:`ccpd.store.queries.roll_span`, so the numbers are the daemon's own math: only
    ``op = 'messages'`` samples are rolled up; an hour row per (hour, model) sums
    tokens, ``dirty_s``, ``stream_s`` and the count, with TTFT p50/p90/p99 (linear
    interpolation) over the samples with ``status < 400`` and ``ttft_ms > 0``; a day row sums
    its hours. ``roll_span`` steps over the whole span of the samples in six-day windows (empty
    stretches skipped), so history of any age is aggregated.

Inputs
    ``*.sqlite3``: opened read-only (``file:…?mode=ro``); the ``SAMPLE_COLUMNS`` the table has
    are read (a version-1 database lacks the later ones, which are taken as NULL/0).
    A PostgreSQL URL: read the same way, every instance's samples (the team's store), in a
    read-only transaction; psycopg is imported only then (``pip install 'ccpd[postgresql]'``).
    ``*.jsonl``: each line is detected on its own — a ``ccp db export --jsonl`` row (has
    ``dirty_s``/``stream_s``: the ``SAMPLE_COLUMNS`` keys) or a daemon ``usage.jsonl`` record
    (``dirty_ms``, ``stream_ms``, ``reroute_decision``; converted with ``sample_row``). Rotated
    logs (``usage.jsonl.1`` …) are not matched: rename them to ``*.jsonl`` to include them. A
    torn last line (no newline at the end of the file and not a whole JSON object: a crash
    mid-write) is skipped silently; other lines that do not parse, are not objects, lack a
    finite numeric ``ts`` or a ``rid``, or have values of the wrong type are skipped with a
    warning on stderr (the daemon's own recovery from ``usage.jsonl`` skips such lines too).

Output
    ``{"granularity": "hour"|"day", "models": {model: [entry, ...]}, "samples": N,
    "sources": [...]}`` where entries (oldest first) have the shape of ``/v1/usage/rollups``
    (:func:`ccpd.store.queries.rollup_entry`; a day entry's ``window_start`` is its UTC
    midnight and its TTFT fields are null, as in the endpoint), ``samples`` is the number of
    distinct samples loaded (all ops, not only the rolled-up Messages ones) and ``sources`` the
    sorted base names of the input files (and the URLs, without password, of the databases;
    ``files`` in the summary line counts those too). Unlike the endpoint there is no
    wall-clock ``ts``: the files depend on the inputs only, so a rerun over the same inputs is
    byte-identical. Written as ``json.dumps(sort_keys=True, indent=2)`` plus a newline, each
    atomically (temporary file in ``--out``, flushed to disk, then ``os.replace``:
    ``ccpd.store.files``).

Errors (no ``--in`` directory, no input file, a file that cannot be read, a ``.sqlite3`` that
is not a SQLite database or has no ``usage_sample`` table, a database that cannot be reached or
has none) print one line naming the file or the URL (never its password) on stderr and exit
with status 2; nothing is written then.

Stdlib only (psycopg for a URL): no Twisted, so it runs anywhere the package is importable.
"""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from pathlib import Path

from ccpd.config import check_database_url, database_error, database_location
from ccpd.store.queries import (
    DAY, SAMPLE_COLUMNS, insert_samples, query_rollups, roll_span, sample_row_of)
from ccpd.store.files import atomic_file, connect_readonly, jsonl_lines
from ccpd.store.schema import migrate

DEFAULT_OUT = "results/rollups"
PATTERNS = ("*.sqlite3", "*.jsonl")
CONNECT_TIMEOUT_S = 10
_DEFAULTS = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "instance": ""}


# what roll() does arithmetic on: NULL (an export missing the key, a NULL column) counts as 0
_NUMERIC = ("input_tokens", "output_tokens", "dirty_s", "stream_s", "ttft_ms", "status")


def clean(values: dict) -> tuple | None:
    """``values`` (column → value) as a ``SAMPLE_COLUMNS`` row; None when it is no sample."""
    if not _valid_key(values.get("ts"), values.get("rid")):
        return None
    for name in _NUMERIC:
        value = values.get(name)
        if value is None:
            values[name] = 0
        elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            return None
    return tuple(_DEFAULTS.get(name) if values.get(name) is None else values[name]
                 for name in SAMPLE_COLUMNS)


class AggError(Exception):
    """A problem with the inputs or the output directory: reported in one line, exit 2."""


# -- inputs ----------------------------------------------------------------------------------------

def find_inputs(directories: list[str]) -> list[Path | str]:
    """The input files of every directory and the URLs among ``directories``, each once,
    ordered by name (:func:`name_of`) then full path."""
    found: dict[Path | str, Path | str] = {}
    for directory in directories:
        if "://" in directory:
            try:
                url = check_database_url(directory)
            except ValueError as e:  # not repeated: it may hold a password
                raise AggError(f"--in: a URL {e}") from None
            found.setdefault(url, url)
            continue
        path = Path(directory)
        if not path.is_dir():
            raise AggError(f"{directory}: no such directory")
        for pattern in PATTERNS:
            for file in path.glob(pattern):
                if file.is_file():
                    found.setdefault(file.resolve(), file)
    if not found:
        raise AggError(f"no *.sqlite3 or *.jsonl files in {', '.join(directories)}")
    return sorted(found.values(), key=lambda source: (name_of(source), str(
        source if isinstance(source, str) else source.resolve())))


def name_of(source: Path | str) -> str:
    """A file's base name, a database's URL without its password."""
    return database_location(source) if isinstance(source, str) else source.name


def _valid_key(ts, rid) -> bool:
    return (isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
            and isinstance(rid, str) and rid != "")


def _read_samples(name, connection, present: set[str], warn) -> list[tuple]:
    """The ``usage_sample`` rows of a store whose table has the columns ``present``, as
    ``SAMPLE_COLUMNS`` tuples: the columns it lacks (an older schema) are taken as NULL/0."""
    if not present:
        raise AggError(f"{name}: no usage_sample table (not a ccpd store?)")
    if not {"ts", "rid"} <= present:
        raise AggError(f"{name}: usage_sample has no ts/rid columns")
    columns = [column for column in SAMPLE_COLUMNS if column in present]
    rows = connection.execute(
        f"SELECT {', '.join(columns)} FROM usage_sample").fetchall()  # noqa: S608
    samples = [row for row in (clean(dict(zip(columns, values))) for values in rows) if row]
    if len(samples) < len(rows):
        warn(f"{name}: skipped {len(rows) - len(samples)} row(s) that are not samples")
    return samples


def read_sqlite(path: Path, warn) -> list[tuple]:
    """The ``usage_sample`` rows of a store file, as ``SAMPLE_COLUMNS`` tuples."""
    try:
        connection = connect_readonly(path)
    except sqlite3.Error as e:
        raise AggError(f"{path}: cannot open: {e}") from None
    try:
        present = {row[1] for row in connection.execute("PRAGMA table_info(usage_sample)")}
        return _read_samples(path, connection, present, warn)
    except sqlite3.DatabaseError as e:
        raise AggError(f"{path}: not a readable SQLite database: {e}") from None
    finally:
        connection.close()


def read_postgresql(url: str, warn) -> list[tuple]:
    """The ``usage_sample`` rows of a PostgreSQL store (every instance's), as
    ``SAMPLE_COLUMNS`` tuples; a failure is one line naming the URL without its password."""
    name = database_location(url)
    try:
        import psycopg
    except ImportError:
        raise AggError(f"{name}: reading PostgreSQL needs the psycopg package: "
                       "pip install 'ccpd[postgresql]'") from None
    try:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S,
                             application_name="ccp-agg") as connection:
            connection.read_only = True
            present = {row[0] for row in connection.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'usage_sample'")}
            return _read_samples(name, connection, present, warn)
    except psycopg.Error as e:
        raise AggError(f"{name}: {database_error(url, e)}") from None


def _row_or_none(record) -> tuple | None:
    """The sample row of a parsed line, or None when it is not a usable sample."""
    row = sample_row_of(record)
    return None if row is None else clean(dict(zip(SAMPLE_COLUMNS, row)))


def read_jsonl(path: Path, warn) -> list[tuple]:
    """The sample rows of an export or a daemon log."""
    samples, skipped, first_skipped = [], 0, None
    try:
        with open(path, "rb") as f:
            for line in jsonl_lines(f):
                row = _row_or_none(line.record)
                if row is not None:
                    samples.append(row)
                elif not line.ignored:
                    skipped += 1
                    first_skipped = first_skipped or line.number
    except OSError as e:
        raise AggError(f"{path}: cannot read: {e.strerror or e}") from None
    if skipped:
        warn(f"{path}: skipped {skipped} line(s) that are not samples (first: line "
             f"{first_skipped})")
    return samples


def load(files: list[Path | str], warn) -> list[tuple]:
    """The distinct samples of every file and database, oldest first; the first copy of a
    (ts, rid) wins."""
    samples: dict[tuple, tuple] = {}
    for path in files:
        if isinstance(path, str):
            rows = read_postgresql(path, warn)
        elif path.suffix == ".sqlite3":
            rows = read_sqlite(path, warn)
        else:
            rows = read_jsonl(path, warn)
        for row in rows:
            samples.setdefault((row[0], row[1]), row)
    return [samples[key] for key in sorted(samples)]


# -- rollups -------------------------------------------------------------------------------------

def rollups(samples: list[tuple]) -> tuple[dict, dict]:
    """``(hour models, day models)`` of ``samples`` (sorted by time), by the daemon's own
    rollup code."""
    connection = sqlite3.connect(":memory:")
    try:
        cursor = connection.cursor()
        migrate(cursor)
        insert_samples(cursor, samples)
        if not samples:
            return {}, {}
        first = samples[0][0]
        roll_span(cursor, first, samples[-1][0])
        since = math.floor(first / DAY) * DAY
        return (query_rollups(cursor, "hour", None, since),
                query_rollups(cursor, "day", None, since))
    finally:
        connection.close()


# -- output --------------------------------------------------------------------------------------

def render(granularity: str, models: dict, sources: list[str], samples: int) -> bytes:
    document = {"granularity": granularity, "models": models, "sources": sources,
                "samples": samples}
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")


def aggregate(directories: list[str], out: str, warn=None) -> dict:
    """Merge the inputs of ``directories`` into ``out``; what was done, for the summary."""
    warn = warn or (lambda message: None)
    files = find_inputs(directories)
    samples = load(files, warn)
    hours, days = rollups(samples)
    sources = sorted(name_of(path) for path in files)
    out_dir = Path(out)
    written = {}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for granularity, models in (("hour", hours), ("day", days)):
            path = out_dir / f"rollup_{granularity}.json"
            with atomic_file(path) as f:
                f.write(render(granularity, models, sources, len(samples)))
            written[granularity] = path
    except OSError as e:
        raise AggError(f"{e.filename or out}: cannot write: {e.strerror or e}") from None
    return {"samples": len(samples), "files": len(files), "paths": written,
            "hour_rows": sum(len(rows) for rows in hours.values()),
            "day_rows": sum(len(rows) for rows in days.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ccp-agg",
        description="Merge the usage samples of *.sqlite3 stores, JSONL exports and "
                    "PostgreSQL stores (team mode) into rollup_hour.json and rollup_day.json "
                    "(deterministic: a rerun over the same inputs writes byte-identical files).")
    parser.add_argument("--in", dest="inputs", action="append", required=True,
                        metavar="DIR|URL",
                        help="a directory of *.sqlite3 and *.jsonl files, or a PostgreSQL store "
                             "as postgresql://user[:password]@host[:port]/database (repeatable)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where the rollup files go (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    def warn(message):
        print(f"ccp-agg: warning: {message}", file=sys.stderr)

    try:
        done = aggregate(args.inputs, args.out, warn)
    except AggError as e:
        print(f"ccp-agg: {e}", file=sys.stderr)
        return 2
    print(f"merged {done['samples']} samples from {done['files']} files into "
          f"{done['paths']['hour']} ({done['hour_rows']} hour rows) and "
          f"{done['paths']['day'].name} ({done['day_rows']} day rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

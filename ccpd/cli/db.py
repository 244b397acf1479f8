"""``ccp db status | export --csv|--jsonl | import --jsonl FILE``: the store itself.

The store is chosen as the daemon chooses it: ``--db PATH`` or ``--url URL``, else
``$CCP_DB_URL`` (team mode's PostgreSQL), else ``$CCP_DB_PATH``, else ``logs/ccp.sqlite3``.
A SQLite file is read with the stdlib :mod:`sqlite3`, also while the daemon runs (the store is
in WAL mode); a PostgreSQL store with psycopg, imported only then (so ``ccp`` starts without
it) together with the store's own cursor, so the same :mod:`ccpd.store.queries` run on both.
A URL is only ever shown without its password (:func:`ccpd.config.database_location`).

``status`` and ``export`` open the store read-only and never create it; ``status`` of a
PostgreSQL store also counts the samples of each instance (each daemon of the team).
``import`` creates or migrates a SQLite file, loads ``usage.jsonl`` records (or the rows of a
``db export --jsonl``), skipping those already stored, and rolls up the hours it imported. It
refuses a PostgreSQL store: that is the team's live quota ledger, whose samples come from its
daemons (old samples imported there would count against the team's quota, and their rollups
would race the team's roller). Stdlib only on SQLite, like :mod:`ccpd.cli`.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import sys
import time

from ccpd.cli.common import DASH, EXIT_ERROR, EXIT_OK, EXIT_USAGE, CliError, _emit, _num, _obj
from ccpd.config import check_database_url, database_error, database_location
from ccpd.store import queries, schema
from ccpd.store.files import atomic_file, connect_readonly, jsonl_lines

DEFAULT_DB = "logs/ccp.sqlite3"
DB_ENV = "CCP_DB_PATH"
URL_ENV = "CCP_DB_URL"
URL_SCHEMES = ("postgresql://", "postgres://")
DB_TIMEOUT_S = 10.0
IMPORT_BATCH = 2000
PROGRESS_MIN_BYTES = 1 << 20  # below this a terminal gets no progress bar (unless --progress)
PROGRESS_EVERY_S = 0.1
PROGRESS_WIDTH = 20
_ROLLUP_TABLES = ("usage_sample", "usage_rollup_hour", "usage_rollup_day")


def resolve_store(path: str | None, url: str | None, environ=None) -> str:
    """The store's path or URL, as ccpd chooses it: ``--db PATH`` or ``--url URL``, else
    ``$CCP_DB_URL``, else ``$CCP_DB_PATH``, else ``logs/ccp.sqlite3``. A URL (also one given
    to ``--db``) is checked here, with a message that does not repeat it: it may hold a
    password."""
    environ = os.environ if environ is None else environ
    if path and url:
        raise CliError("ccp: give the store as --db PATH or as --url URL, not both")
    if path and "://" not in path:
        return path
    url = path or url or environ.get(URL_ENV)
    if not url:
        return environ.get(DB_ENV) or DEFAULT_DB
    try:
        return check_database_url(url)
    except ValueError as e:
        raise CliError(f"ccp: the store URL {e}") from None


def is_url(target: str) -> bool:
    """Whether the store is a PostgreSQL database (also when ``--db`` was given a URL)."""
    return target.startswith(URL_SCHEMES)


def human_bytes(n) -> str:
    """``512 B``, ``4.0 KB``, ``1.2 MB``, ``3.1 GB`` (powers of 1024)."""
    n = _num(n)
    if n is None:
        return DASH
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024.0
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def human_ago(seconds) -> str:
    """How long ago ``seconds`` was: ``just now``, ``1 minute ago``, ``42 minutes ago``,
    ``5 hours ago``, ``3 days ago`` (``in 2 minutes`` for a time ahead of the clock)."""
    s = _num(seconds)
    if s is None:
        return DASH
    ahead, s = s < 0, abs(s)
    if s < 60:
        return "just now"
    for unit, size, below in (("minute", 60, 120 * 60), ("hour", 3600, 48 * 3600),
                              ("day", 86400, None)):
        if below is None or s < below:
            count = int(s // size)
            text = f"{count} {unit}{'' if count == 1 else 's'}"
            return f"in {text}" if ahead else f"{text} ago"
    raise AssertionError("unreachable")


def fmt_utc(ts) -> str:
    """A Unix timestamp as UTC ISO 8601 (``2026-11-26T13:02:11Z``)."""
    from datetime import datetime, timezone

    t = _num(ts)
    if t is None:
        return DASH
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return format(t, "g")


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _sqlite_error(path: str, error) -> CliError:
    return CliError(f"ccp: {path}: {error}", EXIT_ERROR)


def _postgresql_error(url: str, error) -> CliError:
    """The first line of a psycopg error (libpq adds hints on more lines), named by the URL
    without its password, and with any copy of the password masked."""
    return CliError(f"ccp: {database_location(url)}: {database_error(url, error)}", EXIT_ERROR)


def _require_store(path: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"ccp: no store at {path} (ccpd creates it on start; "
                       f"set --db or {DB_ENV})")
    if os.path.isdir(path):
        raise CliError(f"ccp: {path} is a directory, not a store file")


def _connect_ro(path: str):
    """A read-only connection: never creates nor changes the file."""
    try:
        return connect_readonly(path, DB_TIMEOUT_S)
    except sqlite3.Error as e:
        raise _sqlite_error(path, e)


def _check_is_store(cursor, path: str) -> None:
    if queries.is_postgresql(cursor):
        cursor.execute("SELECT table_name FROM information_schema.tables "
                       "WHERE table_schema = current_schema()")
    else:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    tables = {row[0] for row in cursor.fetchall()}
    missing = [t for t in ("schema_version",) + _ROLLUP_TABLES if t not in tables]
    if missing:
        raise CliError(f"ccp: {path}: not a ccpd store (no {', '.join(missing)} table)",
                       EXIT_ERROR)


class _Store:
    """A read-only connection to the store at ``target`` (a SQLite path or a PostgreSQL URL),
    checked to be a ccpd store; ``where`` names it (a URL without its password). Used with
    ``with``, the driver's errors become the one-line :class:`CliError` of :meth:`fail` and
    close the connection; :meth:`close` closes it otherwise."""

    def __init__(self, target: str):
        self.target = target
        if not is_url(target):
            _require_store(target)
            self.where, self.errors = target, sqlite3.Error
            self.connection = _connect_ro(target)
            self.cursor = self.connection.cursor()
        else:
            try:  # only here: ``ccp`` starts without psycopg (and without Twisted)
                import psycopg

                from ccpd.store.queries import PostgresCursor  # takes the queries' "?"
            except ImportError as e:
                raise CliError(f"ccp: a PostgreSQL store needs the {e.name} package: "
                               "pip install 'ccpd[postgresql]'", EXIT_ERROR) from None
            self.where, self.errors = database_location(target), psycopg.Error
            try:
                self.connection = psycopg.connect(target, connect_timeout=int(DB_TIMEOUT_S),
                                                  application_name="ccp db")
            except psycopg.Error as e:
                raise self.fail(e) from None
            self.connection.read_only = True  # every transaction: nothing can be written
            self.cursor = PostgresCursor(self.connection.cursor())
        with self:
            _check_is_store(self.cursor, self.where)

    def fail(self, error) -> CliError:
        if is_url(self.target):
            return _postgresql_error(self.target, error)
        return _sqlite_error(self.target, error)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self):
        return self.cursor

    def __exit__(self, kind, error, traceback):
        if error is None:
            return
        self.close()
        if isinstance(error, self.errors):
            raise self.fail(error) from None


def _newest(ts, now: float) -> dict:
    return {"newest_sample_ts": ts,
            "newest_sample_utc": fmt_utc(ts) if ts is not None else None,
            "newest_sample_age_s": round(now - ts, 3) if ts is not None else None}


def db_status(target: str, now: float | None = None) -> dict:
    """What ``ccp db status`` shows, read from the store at ``target`` (a path or a URL)."""

    now = time.time() if now is None else now
    store = _Store(target)
    with store as cursor:
        found = queries.status(cursor)
        cursor.execute("SELECT count(DISTINCT model) FROM usage_sample WHERE model != ''")
        models = cursor.fetchone()[0]
        if is_url(target):
            size = queries.database_size(cursor)
            # a team's store: which daemons recorded what, and which went quiet
            cursor.execute("SELECT instance, count(*), max(ts) FROM usage_sample "
                           "GROUP BY instance ORDER BY instance")
            instances = {name: {"samples": count, **_newest(newest, now)}
                         for name, count, newest in cursor.fetchall()}
    store.close()
    info = {
        "schema_version": found["schema_version"],
        "schema_latest": schema.LATEST,
        "rows": found["rows"],
        **_newest(found["newest_sample_ts"], now),
        "models": models,
    }
    if is_url(target):
        return {"url": store.where, "size_bytes": size, "instances": instances, **info}
    return {"path": target, "size_bytes": _file_size(target),
            "wal_bytes": _file_size(target + "-wal"), **info}


def format_db_status(info: dict) -> str:
    """The text of ``ccp db status`` (without a trailing newline)."""
    size = human_bytes(info.get("size_bytes"))
    if info.get("wal_bytes") is not None:
        size += f" (+ WAL {human_bytes(info['wal_bytes'])})"
    version = info.get("schema_version")
    latest = info.get("schema_latest")
    schema_text = DASH if version is None else str(version)
    if version is not None and latest is not None and version < latest:
        schema_text += f" (this ccp knows {latest}; ccpd migrates on start)"
    elif version is not None and latest is not None and version > latest:
        schema_text += f" (newer than this ccp's {latest})"
    rows = _obj(info.get("rows"))

    def newest(entry: dict) -> str:
        ts = entry.get("newest_sample_ts")
        return ("none" if ts is None else
                f"{fmt_utc(ts)} ({human_ago(entry.get('newest_sample_age_s'))})")

    def count(value) -> str:
        v = _num(value)
        return DASH if v is None else f"{v:,.0f}"

    lines = [
        ("store", str(info.get("url") or info.get("path"))),
        ("size", size),
        ("schema version", schema_text),
        ("samples", count(rows.get("usage_sample"))),
        ("hour rollups", count(rows.get("usage_rollup_hour"))),
        ("day rollups", count(rows.get("usage_rollup_day"))),
        ("newest sample", newest(info)),
        ("models", count(info.get("models"))),
    ]
    if "instances" in info:  # a team's store: the samples of each daemon
        instances = _obj(info["instances"])
        lines.append(("instances", count(len(instances))))
        for name, entry in instances.items():
            entry = _obj(entry)
            samples = _num(entry.get("samples"))
            lines.append((f"  {name or '(none)'}",
                          f"{count(samples)} sample{'' if samples == 1 else 's'}, "
                          f"newest {newest(entry)}"))
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in lines)


def _target(args) -> str:
    return resolve_store(args.db or args.db_parent, args.url or args.url_parent)


def cmd_db_status(args) -> int:
    info = db_status(_target(args))
    if args.json:
        _emit(json.dumps(info, indent=2, sort_keys=True), sys.stdout)
    else:
        _emit(format_db_status(info), sys.stdout)
    return EXIT_OK


def export_rows(target: str, since: float | None = None, model: str | None = None):
    """``(columns, rows)``: the samples of the store at ``target`` (a path or a URL), ordered
    by ``(ts, rid)``; ``rows`` is a lazy iterator that closes the connection when it is
    exhausted."""

    columns = queries.SAMPLE_COLUMNS
    sql = f"SELECT {', '.join(columns)} FROM usage_sample"
    where, params = [], []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if model:
        where.append("model = ?")
        params.append(model)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts, rid"
    store = _Store(target)
    with store as cursor:
        cursor.execute(sql, params)
    return columns, _Rows(store)


class _Rows:
    """The rows of an export query, fetched a thousand at a time; :meth:`close` (also at the
    end of the iteration) closes the read-only connection."""

    def __init__(self, store: _Store):
        self.store = store

    def __iter__(self):

        try:
            while True:
                batch = self.store.cursor.fetchmany(1000)
                if not batch:
                    return
                yield from batch
        except self.store.errors as e:
            raise self.store.fail(e) from None
        finally:
            self.close()

    def close(self) -> None:
        self.store.close()


def write_export(stream, columns, rows, fmt: str) -> int:
    """Write ``rows`` as CSV (header first) or JSON lines; how many rows were written."""

    n = 0
    if fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(row)
            n += 1
    else:
        for row in rows:
            stream.write(json.dumps(dict(zip(columns, row)), separators=(",", ":")) + "\n")
            n += 1
    return n


def cmd_db_export(args) -> int:
    fmt = "csv" if args.csv else "jsonl"
    columns, rows = export_rows(_target(args), since=args.since, model=args.model)
    if not args.out or args.out == "-":
        try:
            write_export(sys.stdout, columns, rows, fmt)
        finally:
            rows.close()
        sys.stdout.flush()
        return EXIT_OK
    try:
        with atomic_file(args.out, "w", encoding="utf-8", newline="") as out:
            n = write_export(out, columns, rows, fmt)
    except OSError as e:
        raise CliError(f"ccp: {args.out}: {e.strerror or e}", EXIT_ERROR)
    finally:
        rows.close()
    print(f"exported {n:,} samples to {args.out}", file=sys.stderr)
    return EXIT_OK


class Progress:
    """One updating ``importing FILE  42% [=====>     ] 123,456 lines`` line on ``stream``."""

    def __init__(self, stream, name: str, total: int, clock=time.monotonic):
        self.stream = stream
        self.name = name
        self.total = total
        self.clock = clock
        self._last = None

    def line(self, done: int, lines: int) -> str:
        fraction = 1.0 if self.total <= 0 else min(1.0, done / self.total)
        filled = int(fraction * PROGRESS_WIDTH)
        bar = "=" * filled
        if filled < PROGRESS_WIDTH:
            bar = (bar + ">").ljust(PROGRESS_WIDTH) if filled else " " * PROGRESS_WIDTH
        return f"importing {self.name} {int(fraction * 100):3d}% [{bar}] {lines:,} lines"

    def update(self, done: int, lines: int) -> None:
        now = self.clock()
        if self._last is not None and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        self.stream.write("\r" + self.line(done, lines))
        self.stream.flush()

    def finish(self, done: int, lines: int) -> None:
        self.stream.write("\r" + self.line(done, lines) + "\n")
        self.stream.flush()


def import_jsonl(db_path: str, jsonl_path: str, progress: Progress | None = None) -> dict:
    """Load the samples of ``jsonl_path`` into the store (created or migrated as needed);
    ``{"new", "stored", "skipped", "lines"}``. Rows already stored are left as they are."""

    counts = {"new": 0, "stored": 0, "skipped": 0, "lines": 0}
    directory = os.path.dirname(os.path.abspath(db_path))
    try:
        source = open(jsonl_path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CliError(f"ccp: {jsonl_path}: {e.strerror or e}",
                       EXIT_USAGE if isinstance(e, (FileNotFoundError, IsADirectoryError))
                       else EXIT_ERROR)
    connection = None
    done = 0
    try:
        os.makedirs(directory, exist_ok=True)
        connection = sqlite3.connect(db_path, timeout=DB_TIMEOUT_S)
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # as ccpd keeps it: readers never wait
        schema.migrate(cursor)
        connection.commit()
        batch: list[tuple] = []
        span = [float("inf"), float("-inf")]  # of the samples read: what to roll up

        def flush() -> None:
            new = queries.insert_samples(cursor, batch)
            connection.commit()
            counts["new"] += new
            counts["stored"] += len(batch) - new
            batch.clear()

        for line in jsonl_lines(source):
            done, counts["lines"] = line.offset, line.number
            row = queries.sample_row_of(line.record)
            if line.ignored:
                pass
            elif row is None:
                counts["skipped"] += 1
            else:
                batch.append(row)
                span[0], span[1] = min(span[0], row[0]), max(span[1], row[0])
                if len(batch) >= IMPORT_BATCH:
                    flush()
            if progress is not None:
                progress.update(done, counts["lines"])
        done = source.tell()  # trailing blank lines and a torn line count as read too
        if batch:
            flush()
        if counts["new"]:
            # the roller only re-rolls recent hours: roll up the span imported here
            counts["hours"] = queries.roll_span(cursor, span[0], span[1])["hours"]
            connection.commit()
    except sqlite3.Error as e:
        raise _sqlite_error(db_path, e)
    except OSError as e:
        raise CliError(f"ccp: {e.filename or jsonl_path}: {e.strerror or e}", EXIT_ERROR)
    finally:
        source.close()
        if connection is not None:
            connection.close()
        if progress is not None:
            progress.finish(done, counts["lines"])
    return counts


def cmd_db_import(args) -> int:
    db_path = _target(args)
    if is_url(db_path):
        raise CliError(f"ccp: db import loads a SQLite store only, not {database_location(db_path)}"
                       " (the team's daemons fill a PostgreSQL store): give the file with "
                       "--db PATH")
    if not os.path.exists(args.jsonl):
        raise CliError(f"ccp: {args.jsonl}: no such file")
    if os.path.isdir(args.jsonl):
        raise CliError(f"ccp: {args.jsonl} is a directory")
    size = _file_size(args.jsonl) or 0
    show = args.progress or (size > PROGRESS_MIN_BYTES and use_tty(sys.stderr))
    progress = Progress(sys.stderr, args.jsonl, size) if show else None
    counts = import_jsonl(db_path, args.jsonl, progress)
    _emit(f"imported {counts['new']:,} new samples ({counts['stored']:,} already stored, "
          f"{counts['skipped']:,} lines skipped; {counts.get('hours', 0):,} hour rollups "
          f"recomputed)", sys.stdout)
    return EXIT_OK


def use_tty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):
        return False


def _add_db_option(parser, suffix: str = "") -> None:
    """``--db`` and ``--url``, before the subcommand (``suffix="_parent"``) or after it."""
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--db", metavar="PATH", dest="db" + suffix,
                     help=f"the SQLite store file (default: ${DB_ENV} or {DEFAULT_DB}, unless "
                          f"${URL_ENV} is set)")
    how.add_argument("--url", metavar="URL", dest="url" + suffix,
                     help="a PostgreSQL store (team mode), "
                          f"postgresql://user[:password]@host[:port]/database (default: "
                          f"${URL_ENV})")


def add_db_parser(sub) -> None:
    p = sub.add_parser(
        "db", help="the store: status, export, import",
        description="Work on ccpd's store directly (also while ccpd runs): the SQLite file "
                    f"--db, or the PostgreSQL database --url, else ${URL_ENV}, else "
                    f"${DB_ENV}, else {DEFAULT_DB}. A URL is shown without its password.")
    _add_db_option(p, "_parent")
    p.set_defaults(func=lambda args: _db_usage(p), db=None, url=None)
    dsub = p.add_subparsers(dest="db_command", metavar="COMMAND")

    s = dsub.add_parser("status", help="size, schema version, row counts, newest sample",
                        description="Show the store's size, schema version, row counts, "
                                    "newest sample and number of models, and on PostgreSQL "
                                    "the samples of each instance (each daemon of the team). "
                                    "Opens it read-only.")
    _add_db_option(s)
    s.add_argument("--json", action="store_true", help="print the same as JSON")
    s.set_defaults(func=cmd_db_status)

    e = dsub.add_parser("export", help="write the stored samples as CSV or JSON lines",
                        description="Write the usage_sample rows, oldest first, as CSV (with a "
                                    "header) or as JSON lines (one object per row, which "
                                    "`ccp db import` and ccp-agg read back). Opens the store "
                                    "read-only.")
    _add_db_option(e)
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", action="store_true", help="CSV, header first")
    fmt.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    e.add_argument("--since", type=float, metavar="EPOCH",
                   help="only samples at or after this Unix time")
    e.add_argument("--model", metavar="MODEL", help="only samples of this (requested) model")
    e.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    e.set_defaults(func=cmd_db_export)

    i = dsub.add_parser("import", help="load usage.jsonl records (or a JSONL export)",
                        description="Load the samples of a usage.jsonl file (or of a "
                                    "`ccp db export --jsonl`) into the store, creating or "
                                    "migrating it as needed. Samples already stored are "
                                    "skipped, so importing twice adds nothing; lines that are "
                                    "not samples (a torn last line) are skipped and counted. "
                                    "Only FILE is read: import rotated files (usage.jsonl.1, "
                                    "...) with one command each. SQLite only: a PostgreSQL "
                                    "store is the team's quota ledger, filled by its daemons.")
    _add_db_option(i)
    i.add_argument("--jsonl", metavar="FILE", required=True, help="the file to import")
    i.add_argument("--progress", action="store_true",
                   help="show the progress line on stderr even when it is not a terminal "
                        "(a terminal gets it for files over 1 MB)")
    i.set_defaults(func=cmd_db_import)


def _db_usage(parser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE

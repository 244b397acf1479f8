"""``ccp``: the command-line client of a running ccpd, and of its SQLite store.

``ccp status`` asks the daemon for ``/v1/usage`` and prints one row per model: how much of the
rolling and weekly quota is used, the headroom left, whether ccpd warns or blocks, the warn
threshold (configured and auto-calibrated) and how far off the calibration gap is.
``--speeds`` adds throughput columns, ``--debug-quota`` a per-model policy section, ``--json``
prints the daemon's answer as it is.

``ccp db status | export --csv|--jsonl | import --jsonl FILE`` work on the store file itself
(``--db``, else ``$CCP_DB_PATH``, else ``logs/ccp.sqlite3``) with the stdlib :mod:`sqlite3`,
also while the daemon runs (the store is in WAL mode). ``status`` and ``export`` open it
read-only and never create it; ``import`` creates or migrates it and loads ``usage.jsonl``
records (or the rows of a ``db export --jsonl``), skipping those already stored.

Stdlib only, so it runs from any Python without the daemon's dependencies: the store modules
are imported only by the ``db`` commands (see :func:`_store_modules`). The formatting is in
small pure functions (:func:`format_status`, :func:`human_tokens`, :func:`format_db_status`,
...) so tests call them directly. Every field of the usage body may be null or missing; it then
prints as ``-``.

Subcommands are argparse subparsers, each registered by an ``_add_<name>_parser`` function and
run by the ``func`` it sets.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8787"
URL_ENV = "CCP_URL"
TIMEOUT_S = 5.0
DASH = "-"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # also: the daemon could not be asked, or answered something unusable

_ANSI = {"warn": "\033[33m", "block": "\033[31m"}
_ANSI_RESET = "\033[0m"


class CliError(Exception):
    """A failure to report as one line on stderr (no traceback) with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- field access

def _num(value) -> float | None:
    """``value`` when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or value in (float("inf"), float("-inf")):  # NaN / infinities
        return None
    return value


def _obj(value) -> dict:
    """``value`` when it is a JSON object, else an empty one (so lookups give None)."""
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, "g")
    return str(value)


# --------------------------------------------------------------------------- small formatters

def human_tokens(n) -> str:
    """A token count in short human units: ``900``, ``1.2k``, ``350k``, ``3.4M``, ``1.5B``."""
    n = _num(n)
    if n is None:
        return DASH
    sign, n = ("-" if n < 0 else ""), abs(n)
    if n < 1000:
        return f"{sign}{n:.0f}"
    for unit, size in (("k", 1e3), ("M", 1e6), ("B", 1e9)):
        scaled = n / size
        if round(scaled, 1) < 1000 or unit == "B":
            text = f"{scaled:.1f}" if scaled < 99.95 else f"{scaled:.0f}"
            if text.endswith(".0"):
                text = text[:-2]
            return f"{sign}{text}{unit}"
    raise AssertionError("unreachable")


def human_hours(h) -> str:
    h = _num(h)
    if h is None:
        return DASH
    return f"{h:.2f}".rstrip("0").rstrip(".") + "h"


def human_duration(seconds) -> str:
    """``95`` -> ``1m35s``, ``12000`` -> ``3h20m``, ``590000`` -> ``6d19h``."""
    s = _num(seconds)
    if s is None:
        return DASH
    sign, s = ("-" if s < 0 else ""), int(round(abs(s)))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_pct(fraction) -> str:
    """A fraction (0.8) as a percentage (``80%``; ``74.5%`` keeps one decimal when it matters)."""
    f = _num(fraction)
    if f is None:
        return DASH
    return _pct_number(f * 100)


def _pct_number(p: float) -> str:
    if abs(p - round(p)) < 0.05:
        return f"{round(p):.0f}%"
    return f"{p:.1f}%"


def fmt_headroom(pct) -> str:
    """``headroom_pct`` is already a percentage (17.5 means 17.5 %)."""
    p = _num(pct)
    return DASH if p is None else _pct_number(p)


def fmt_used_limit(window: dict) -> str:
    """``1.6M/2M``; only the used count when there is no token limit.

    A window limited in hours instead of tokens shows ``0.42h/5h``.
    """
    window = _obj(window)
    used, limit = window.get("used_tokens"), _num(window.get("limit_tokens"))
    if limit is not None:
        return f"{human_tokens(used)}/{human_tokens(limit)}"
    if _num(window.get("limit_hours")) is not None:
        return f"{human_hours(window.get('used_hours'))}/{human_hours(window.get('limit_hours'))}"
    return human_tokens(used)


def model_state(m: dict) -> str:
    """``OK`` / ``WARN`` / ``BLOCK`` from ``state``, else from the ``block``/``warn`` flags."""
    state = m.get("state")
    if isinstance(state, str) and state.strip():
        return state.strip().upper()
    if m.get("block") is True:
        return "BLOCK"
    if m.get("warn") is True:
        return "WARN"
    if m.get("warn") is False and m.get("block") is False:
        return "OK"
    return DASH


def fmt_warn(m: dict) -> str:
    """Configured warn % and, when calibration moved it, the auto one: ``80%→74%``.

    A ``?`` marks an auto value calibrated on too few samples (``min_samples_reached`` false).
    """
    configured, auto = fmt_pct(m.get("warn_pct")), fmt_pct(m.get("warn_pct_auto"))
    if auto == DASH or auto == configured:
        text = configured
    elif configured == DASH:
        text = f"auto {auto}"
    else:
        text = f"{configured}→{auto}"
    if m.get("min_samples_reached") is False and text != DASH:
        text += "?"
    return text


def fmt_seconds(value) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.0f}s"


def fmt_count(value) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.0f}"


def fmt_rate(value) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.1f}"


def fmt_ms(value) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.0f}ms"


def fmt_local_time(ts) -> str:
    """A Unix timestamp in local time (``2026-11-26 14:02:11``); other text as it is."""
    t = _num(ts)
    if t is None:
        return _text(ts) or DASH
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return format(t, "g")


# --------------------------------------------------------------------------- the status table

def _headroom(m: dict, window: str) -> str:
    return fmt_headroom(_obj(m.get(window)).get("headroom_pct"))


def _columns(speeds: bool, rolling_title: str):
    """(title, right-aligned?, cell function) for each column of the table."""
    cols = [
        ("MODEL", False, lambda name, m: name),
        (rolling_title, True, lambda name, m: fmt_used_limit(m.get("rolling"))),
        ("HEADROOM", True, lambda name, m: _headroom(m, "rolling")),
        ("WEEKLY", True, lambda name, m: fmt_used_limit(m.get("weekly"))),
        ("HEADROOM", True, lambda name, m: _headroom(m, "weekly")),
        ("STATE", False, lambda name, m: model_state(m)),
        ("WARN AT", False, lambda name, m: fmt_warn(m)),
        ("GAP p50", True, lambda name, m: fmt_seconds(m.get("gap_seconds_p50"))),
        ("GAP p95", True, lambda name, m: fmt_seconds(m.get("gap_seconds_p95"))),
        ("GAPS", True, lambda name, m: fmt_count(m.get("gap_samples"))),
    ]
    if speeds:
        sp = lambda m: _obj(m.get("speeds"))  # noqa: E731
        cols += [
            ("REQS", True, lambda name, m: fmt_count(
                m.get("requests") if m.get("requests") is not None else sp(m).get("samples"))),
            ("OUT t/s STREAM", True, lambda name, m: fmt_rate(sp(m).get("out_tps_stream"))),
            ("OUT t/s TOTAL", True, lambda name, m: fmt_rate(sp(m).get("out_tps_total"))),
            ("TTFT p50", True, lambda name, m: fmt_ms(sp(m).get("ttft_ms_p50"))),
        ]
    return cols


def _rolling_title(models: dict) -> str:
    """``ROLLING 5h`` when every model has the same rolling window, else ``ROLLING``."""
    hours = {_num(_obj(_obj(m).get("rolling")).get("window_hours")) for m in models.values()}
    if len(hours) == 1 and None not in hours:
        return f"ROLLING {human_hours(hours.pop())}"
    return "ROLLING"


def _colourise(cell: str, padded: str) -> str:
    code = _ANSI.get(cell.strip().lower())
    return f"{code}{padded}{_ANSI_RESET}" if code else padded


def format_table(models: dict, speeds: bool = False, colour: bool = False) -> str:
    cols = _columns(speeds, _rolling_title(models))
    rows = [[fn(name, _obj(models[name])) for _, _, fn in cols] for name in sorted(models)]
    widths = [max([len(title)] + [len(r[i]) for r in rows]) for i, (title, _, _) in enumerate(cols)]
    state_col = [title for title, _, _ in cols].index("STATE")

    def line(cells, paint: bool) -> str:
        out = []
        for i, (cell, (_, right, _), width) in enumerate(zip(cells, cols, widths)):
            padded = cell.rjust(width) if right else cell.ljust(width)
            if paint and i == state_col:
                padded = _colourise(cell, padded)
            out.append(padded)
        return "  ".join(out).rstrip()

    lines = [line([title for title, _, _ in cols], False)]
    lines += [line(r, colour) for r in rows]
    return "\n".join(lines)


def format_header(body: dict, url: str | None = None) -> str:
    parts = [f"ccpd {url}" if url else "ccpd"]
    parts.append(f"reroute {_text(body.get('reroute_mode')) or DASH}")
    cooldown = _num(body.get("cooldown_sec"))
    parts.append(f"cooldown {fmt_seconds(cooldown)}")
    ts = _num(body.get("ts"))
    if ts is not None:
        parts.append(f"as of {fmt_local_time(ts)}")
    return "  |  ".join(parts)


def format_debug(models: dict) -> str:
    """The ``--debug-quota`` section: each model's reroute policy state."""
    blocks = []
    for name in sorted(models):
        m = _obj(models[name])
        p = _obj(m.get("policy"))
        active = p.get("cooldown_active")
        cooldown = {True: "ACTIVE", False: "inactive"}.get(active, DASH)
        ends = fmt_local_time(p.get("cooldown_next_ts"))
        remaining = _num(p.get("cooldown_remaining_sec"))
        need = _num(p.get("predicted_need_tokens"))
        rolling, weekly = _obj(m.get("rolling")), _obj(m.get("weekly"))
        lines = [
            f"{name}",
            f"  policy:          mode {_text(p.get('mode')) or DASH},"
            f" lane {_text(p.get('lane')) or DASH},"
            f" secondary {_text(p.get('secondary')) or DASH}",
            f"  cooldown:        {cooldown}"
            + (f", {fmt_seconds(remaining)} left" if remaining and remaining > 0 else ""),
            f"  cooldown ends:   {ends}"
            + (f" (in {human_duration(remaining)})"
               if ends != DASH and remaining is not None else ""),
            f"  overshoot at:    {fmt_local_time(p.get('overshoot_at'))}",
            f"  last decision:   {_text(p.get('last_decision')) or DASH}"
            f" (reason: {_text(p.get('last_reason')) or DASH})",
            f"  predicted need:  "
            + (f"{human_tokens(need)} tokens ({need:.0f})" if need is not None else DASH),
            f"  resets in:       rolling {human_duration(rolling.get('reset_eta_sec'))},"
            f" weekly {human_duration(weekly.get('reset_eta_sec'))}",
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_status(body: dict, speeds: bool = False, debug: bool = False, colour: bool = False,
                  url: str | None = None) -> str:
    """What ``ccp status`` prints for a ``/v1/usage`` body (without a trailing newline)."""
    body = _obj(body)
    models = {str(k): v for k, v in _obj(body.get("models")).items()}
    out = [format_header(body, url), ""]
    if not models:
        out.append("no models seen yet")
        return "\n".join(out)
    out.append(format_table(models, speeds=speeds, colour=colour))
    if debug:
        out += ["", "quota policy:", "", format_debug(models)]
    return "\n".join(out)


# --------------------------------------------------------------------------- talking to ccpd

def resolve_url(arg: str | None, environ=None) -> str:
    """``--url``, else ``$CCP_URL``, else the default; no trailing slash, ``http://`` assumed."""
    environ = os.environ if environ is None else environ
    url = (arg or environ.get(URL_ENV) or DEFAULT_URL).strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _error_message(raw: bytes) -> str | None:
    """``error.message`` of an Anthropic-shaped error body, if it is one."""
    try:
        doc = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:200] or None
    msg = _obj(_obj(doc).get("error")).get("message")
    return _text(msg)


def fetch_json(url: str, path: str, timeout: float = TIMEOUT_S):
    """GET ``url + path`` and parse it as JSON, raising :class:`CliError` for every failure."""
    target = url + path
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = _error_message(e.read() or b"")
        except Exception:  # noqa: BLE001 - the status alone is enough to report
            detail = None
        detail = detail or e.reason or "no message"
        raise CliError(f"ccp: {target} answered HTTP {e.code}: {detail}")
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise CliError(f"ccp: {target} did not answer within {timeout:g}s")
        if isinstance(e.reason, str):  # "unknown url type: ...", "no host given"
            raise CliError(f"ccp: cannot use daemon URL {url!r}: {e.reason}")
        raise CliError(f"ccp: no ccpd answering at {url} (is it running? start it with: make run)")
    except (TimeoutError, socket.timeout):
        raise CliError(f"ccp: {target} did not answer within {timeout:g}s")
    except (ConnectionError, OSError):
        # e.g. reset while reading: something is there, but not answering properly
        raise CliError(f"ccp: no ccpd answering at {url} (is it running? start it with: make run)")
    except ValueError as e:  # malformed URL: "unknown url type", bad port, ...
        raise CliError(f"ccp: cannot use daemon URL {url!r}: {e}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        snippet = raw[:80].decode("utf-8", "replace").strip()
        raise CliError(f"ccp: {target} did not answer JSON (got {snippet!r}); is {url} a ccpd?")


def check_usage_body(body, target: str) -> dict:
    """``body`` if it looks like a ``/v1/usage`` answer, else :class:`CliError`."""
    if not isinstance(body, dict) or "models" not in body:
        raise CliError(f"ccp: {target} answered JSON that is not a usage report"
                       f" (expected an object with \"models\"); is it a ccpd?")
    if body["models"] is not None and not isinstance(body["models"], dict):
        raise CliError(f"ccp: {target} answered a usage report whose \"models\" is not an object")
    return body


def use_colour(stream, environ=None) -> bool:
    """Colour only on a terminal, and not when ``NO_COLOR`` is set (https://no-color.org)."""
    environ = os.environ if environ is None else environ
    if "NO_COLOR" in environ or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):
        return False


def _emit(text: str, stream) -> None:
    """Print ``text``; on a terminal that cannot encode ``→`` fall back to ASCII."""
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        stream.write(text.replace("→", "->").encode("ascii", "replace").decode("ascii") + "\n")
    stream.flush()


# --------------------------------------------------------------------------- commands

def cmd_status(args) -> int:
    url = resolve_url(args.url)
    body = fetch_json(url, "/v1/usage")
    if args.json:
        _emit(json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False), sys.stdout)
        return EXIT_OK
    body = check_usage_body(body, url + "/v1/usage")
    _emit(format_status(body, speeds=args.speeds, debug=args.debug_quota,
                        colour=use_colour(sys.stdout), url=url), sys.stdout)
    return EXIT_OK


def _add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="quota and usage per model, from a running ccpd",
                       description="Show what ccpd has counted per model: rolling and weekly "
                                   "quota use, headroom, warn/block state and calibration.")
    p.add_argument("--speeds", action="store_true",
                   help="add requests, output tokens/s and time-to-first-token columns")
    p.add_argument("--debug-quota", action="store_true",
                   help="add each model's reroute policy state below the table")
    p.add_argument("--json", action="store_true", help="print the daemon's /v1/usage answer as is")
    p.add_argument("--url", metavar="URL",
                   help=f"ccpd base URL (default: ${URL_ENV} or {DEFAULT_URL})")
    p.set_defaults(func=cmd_status)


# --------------------------------------------------------------------------- the store: ccp db

DEFAULT_DB = "logs/ccp.sqlite3"
DB_ENV = "CCP_DB_PATH"
DB_TIMEOUT_S = 10.0
IMPORT_BATCH = 2000
PROGRESS_MIN_BYTES = 1 << 20  # below this a terminal gets no progress bar (unless --progress)
PROGRESS_EVERY_S = 0.1
PROGRESS_WIDTH = 20
_ROLLUP_TABLES = ("usage_sample", "usage_rollup_hour", "usage_rollup_day")
# keys that only a ``ccp db export --jsonl`` row has, and only a usage.jsonl record has
_EXPORT_ONLY_KEYS = ("dirty_s", "decision")
_RECORD_ONLY_KEYS = ("dirty_ms", "reroute_decision")


def _store_modules():
    """``(schema, queries)``: the store's stdlib-only modules, imported on first use so that
    ``ccp status`` does not pay for them."""
    from ccpd.store import queries, schema
    return schema, queries


def resolve_db(arg: str | None, environ=None) -> str:
    """``--db``, else ``$CCP_DB_PATH``, else ``logs/ccp.sqlite3``."""
    environ = os.environ if environ is None else environ
    return arg or environ.get(DB_ENV) or DEFAULT_DB


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


def _require_store(path: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"ccp: no store at {path} (ccpd creates it on start; "
                       f"set --db or {DB_ENV})")
    if os.path.isdir(path):
        raise CliError(f"ccp: {path} is a directory, not a store file")


def _connect_ro(path: str):
    """A read-only connection: never creates nor changes the file."""
    import sqlite3
    from urllib.parse import quote

    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        return sqlite3.connect(uri, uri=True, timeout=DB_TIMEOUT_S)
    except sqlite3.Error as e:
        raise _sqlite_error(path, e)


def _check_is_store(cursor, path: str) -> None:
    cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    tables = {row[0] for row in cursor.fetchall()}
    missing = [t for t in ("schema_version",) + _ROLLUP_TABLES if t not in tables]
    if missing:
        raise CliError(f"ccp: {path}: not a ccpd store (no {', '.join(missing)} table)",
                       EXIT_ERROR)


def db_status(path: str, now: float | None = None) -> dict:
    """What ``ccp db status`` shows, read from the store at ``path``."""
    import sqlite3

    schema, queries = _store_modules()
    _require_store(path)
    now = time.time() if now is None else now
    connection = _connect_ro(path)
    try:
        cursor = connection.cursor()
        _check_is_store(cursor, path)
        found = queries.status(cursor)
        cursor.execute("SELECT count(DISTINCT model) FROM usage_sample WHERE model != ''")
        models = cursor.fetchone()[0]
    except sqlite3.Error as e:
        raise _sqlite_error(path, e)
    finally:
        connection.close()
    newest = found["newest_sample_ts"]
    return {
        "path": path,
        "size_bytes": _file_size(path),
        "wal_bytes": _file_size(path + "-wal"),
        "schema_version": found["schema_version"],
        "schema_latest": schema.LATEST,
        "rows": found["rows"],
        "newest_sample_ts": newest,
        "newest_sample_utc": fmt_utc(newest) if newest is not None else None,
        "newest_sample_age_s": round(now - newest, 3) if newest is not None else None,
        "models": models,
    }


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
    newest = info.get("newest_sample_ts")
    newest_text = ("none" if newest is None else
                   f"{fmt_utc(newest)} ({human_ago(info.get('newest_sample_age_s'))})")

    def count(value) -> str:
        v = _num(value)
        return DASH if v is None else f"{v:,.0f}"

    lines = [
        ("store", str(info.get("path"))),
        ("size", size),
        ("schema version", schema_text),
        ("samples", count(rows.get("usage_sample"))),
        ("hour rollups", count(rows.get("usage_rollup_hour"))),
        ("day rollups", count(rows.get("usage_rollup_day"))),
        ("newest sample", newest_text),
        ("models", count(info.get("models"))),
    ]
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in lines)


def cmd_db_status(args) -> int:
    info = db_status(resolve_db(args.db or args.db_parent))
    if args.json:
        _emit(json.dumps(info, indent=2, sort_keys=True), sys.stdout)
    else:
        _emit(format_db_status(info), sys.stdout)
    return EXIT_OK


def export_rows(path: str, since: float | None = None, model: str | None = None):
    """``(columns, rows)``: the store's samples, ordered by ``(ts, rid)``; ``rows`` is a lazy
    iterator that closes the connection when it is exhausted."""
    import sqlite3

    _, queries = _store_modules()
    _require_store(path)
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
    connection = _connect_ro(path)
    try:
        cursor = connection.cursor()
        _check_is_store(cursor, path)
        cursor.execute(sql, params)
    except BaseException as e:
        connection.close()
        if isinstance(e, sqlite3.Error):
            raise _sqlite_error(path, e)
        raise

    return columns, _Rows(connection, cursor, path)


class _Rows:
    """The rows of an export query, fetched a thousand at a time; :meth:`close` (also at the
    end of the iteration) closes the read-only connection."""

    def __init__(self, connection, cursor, path: str):
        self.connection, self.cursor, self.path = connection, cursor, path

    def __iter__(self):
        import sqlite3

        try:
            while True:
                batch = self.cursor.fetchmany(1000)
                if not batch:
                    return
                yield from batch
        except sqlite3.Error as e:
            raise _sqlite_error(self.path, e)
        finally:
            self.close()

    def close(self) -> None:
        self.connection.close()


def write_export(stream, columns, rows, fmt: str) -> int:
    """Write ``rows`` as CSV (header first) or JSON lines; how many rows were written."""
    import csv

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
    path = resolve_db(args.db or args.db_parent)
    fmt = "csv" if args.csv else "jsonl"
    columns, rows = export_rows(path, since=args.since, model=args.model)
    if not args.out or args.out == "-":
        try:
            write_export(sys.stdout, columns, rows, fmt)
        finally:
            rows.close()
        sys.stdout.flush()
        return EXIT_OK
    partial = f"{args.out}.part"
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            n = write_export(out, columns, rows, fmt)
        os.replace(partial, args.out)
    except OSError as e:
        raise CliError(f"ccp: {args.out}: {e.strerror or e}", EXIT_ERROR)
    finally:
        rows.close()
        if os.path.exists(partial):
            os.unlink(partial)
    print(f"exported {n:,} samples to {args.out}", file=sys.stderr)
    return EXIT_OK


def _is_number(value) -> bool:
    return _num(value) is not None


def import_row(record, columns, sample_row) -> tuple | None:
    """The ``usage_sample`` row of one parsed line, or None when it is not a sample.

    A ``usage.jsonl`` record goes through :func:`ccpd.store.queries.sample_row`; a row of
    ``ccp db export --jsonl`` (``dirty_s``/``decision`` instead of ``dirty_ms``/
    ``reroute_decision``) is already a row and is taken column by column.
    """
    if not isinstance(record, dict):
        return None
    if not _is_number(record.get("ts")) or not isinstance(record.get("rid"), str) \
            or not record["rid"]:
        return None
    exported = (any(k in record for k in _EXPORT_ONLY_KEYS)
                and not any(k in record for k in _RECORD_ONLY_KEYS))
    try:
        if exported:
            return tuple(record.get(c) for c in columns)
        return sample_row(record)
    except (TypeError, ValueError, KeyError):  # e.g. "dirty_ms": "slow"
        return None


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
    import sqlite3

    schema, queries = _store_modules()
    columns, sample_row = queries.SAMPLE_COLUMNS, queries.sample_row
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

        for raw in source:
            done += len(raw)
            counts["lines"] += 1
            if raw.strip():
                try:
                    record = json.loads(raw)
                except ValueError:  # a torn last line, or not JSON at all
                    record = None
                row = import_row(record, columns, sample_row)
                if row is None:
                    counts["skipped"] += 1
                else:
                    batch.append(row)
                    span[0], span[1] = min(span[0], row[0]), max(span[1], row[0])
                    if len(batch) >= IMPORT_BATCH:
                        flush()
            if progress is not None:
                progress.update(done, counts["lines"])
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
    db_path = resolve_db(args.db or args.db_parent)
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


def _add_db_option(parser, dest: str, suppress: bool = False) -> None:
    parser.add_argument("--db", metavar="PATH", dest=dest,
                        help=argparse.SUPPRESS if suppress else
                        f"the store file (default: ${DB_ENV} or {DEFAULT_DB})")


def _add_db_parser(sub) -> None:
    p = sub.add_parser(
        "db", help="the SQLite store: status, export, import",
        description="Work on ccpd's SQLite store file directly (also while ccpd runs). The "
                    f"file is --db, else ${DB_ENV}, else {DEFAULT_DB}.")
    _add_db_option(p, "db_parent")
    p.set_defaults(func=lambda args: _db_usage(p), db=None)
    dsub = p.add_subparsers(dest="db_command", metavar="COMMAND")

    s = dsub.add_parser("status", help="size, schema version, row counts, newest sample",
                        description="Show the store's file size, schema version, row counts, "
                                    "newest sample and number of models. Opens it read-only.")
    _add_db_option(s, "db")
    s.add_argument("--json", action="store_true", help="print the same as JSON")
    s.set_defaults(func=cmd_db_status)

    e = dsub.add_parser("export", help="write the stored samples as CSV or JSON lines",
                        description="Write the usage_sample rows, oldest first, as CSV (with a "
                                    "header) or as JSON lines (one object per row, which "
                                    "`ccp db import` and ccp-agg read back). Opens the store "
                                    "read-only.")
    _add_db_option(e, "db")
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
                                    "...) with one command each.")
    _add_db_option(i, "db")
    i.add_argument("--jsonl", metavar="FILE", required=True, help="the file to import")
    i.add_argument("--progress", action="store_true",
                   help="show the progress line on stderr even when it is not a terminal "
                        "(a terminal gets it for files over 1 MB)")
    i.set_defaults(func=cmd_db_import)


def _db_usage(parser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccp",
        description="Command-line client for ccpd, the local Anthropic API gateway: "
                    "`ccp status` asks the running daemon (--url, else $CCP_URL, else "
                    f"{DEFAULT_URL}); `ccp db status|export|import` work on its SQLite "
                    f"store (--db, else ${DB_ENV}, else {DEFAULT_DB}).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_status_parser(sub)
    _add_db_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already reported
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except CliError as e:
        print(e.message, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # ``ccp status | head``
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter exit quiet
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""``ccp``: the command-line client of a running ccpd, and of its SQLite store.

``ccp status`` asks the daemon for ``/v1/usage`` and prints one row per model: how much of the
rolling and weekly quota is used, the headroom left, whether ccpd warns or blocks, the warn
threshold (configured and auto-calibrated) and how far off the calibration gap is.
``--speeds`` adds throughput columns, ``--debug-quota`` a per-model policy section, ``--json``
prints the daemon's answer as it is, ``--watch [SECONDS]`` refreshes until Ctrl-C. On a terminal
the view is laid out with ``rich`` (:mod:`ccpd.cli.rich_view`); piped, it is the plain text of
:func:`format_status`.

``ccp statusline`` prints one short line for Claude Code's status line: see
:mod:`ccpd.cli.statusline`.

``ccp db status | export | import`` work on the store itself (the SQLite file, or team mode's
PostgreSQL database): see :mod:`ccpd.cli.db`.

Stdlib only apart from ``rich`` for terminals (imported only there, and optional: without it a
terminal gets the plain text), so it runs from any Python without the daemon's dependencies.
The formatting is in small pure functions (:func:`format_status`, :func:`human_tokens`,
...) so tests call them directly. Every field of the usage body may be null or missing; it then
prints as ``-``.

Subcommands are argparse subparsers, each registered by an ``add_<name>_parser``-style function and
run by the ``func`` it sets.
"""
from __future__ import annotations

import json
import os
import sys
import time

from ccpd import jsonparse
from ccpd.cli.common import (DASH, DEFAULT_URL, EXIT_ERROR, EXIT_OK,  # noqa: F401 - used
                             EXIT_USAGE, URL_ENV, CliError, _emit, _num, _obj, _text,
                             resolve_url)  # by ccpd.cli.rich_view and the tests through ccpd.cli

# argparse, urllib and rich are imported where they are used: ``ccp statusline`` (which Claude
# Code runs on every update) must start in a few milliseconds (see ccpd.cli.statusline).

TIMEOUT_S = 5.0
WATCH_DEFAULT_S = 2.0
_ANSI = {"warn": "\033[33m", "block": "\033[31m"}
_ANSI_RESET = "\033[0m"


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
        ("PROVIDER 5h", True, lambda name, m: fmt_provider(m, "five_hour")),
        ("7d", True, lambda name, m: fmt_provider(m, "seven_day", "weekly")),
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


def fmt_provider(m: dict, *windows: str) -> str:
    """The provider's own figure for a window of the model's lane (the first of ``windows``
    it reports: Anthropic's ``seven_day`` is Z.AI's ``weekly``): ``85%``."""
    provider = _obj(m.get("provider"))
    for window in windows:
        utilization = _num(_obj(provider.get(window)).get("utilization"))
        if utilization is not None:
            return _pct_number(100 * utilization)
    return DASH


def format_lanes(lanes: dict) -> str:
    """One line per lane the providers said something about: their figures per window, the
    limit those imply ("learned limit"), and a lane that cannot serve."""
    out = []
    for name in sorted(lanes):
        lane = _obj(lanes[name])
        provider = _obj(lane.get("provider"))
        parts = []
        for window, reading in sorted(_obj(provider.get("windows")).items()):
            reading = _obj(reading)
            status = _text(reading.get("status"))
            figure = (status.upper() if status == "rejected" else
                      fmt_headroom(100 * _num(reading.get("utilization")))
                      if _num(reading.get("utilization")) is not None else DASH)
            parts.append(f"{window} {figure}, resets in "
                         f"{human_duration(reading.get('reset_in_sec'))} "
                         f"({_text(reading.get('source')) or DASH}, "
                         f"{human_duration(reading.get('age_sec'))} ago)")
        for window, learned in sorted(_obj(lane.get("learned_limits")).items()):
            learned = _obj(learned)
            parts.append(f"learned limit {window} {human_tokens(learned.get('tokens'))} tokens "
                         f"(confidence {_num(learned.get('confidence')) or 0:.2f}, "
                         f"{fmt_count(learned.get('samples'))} samples)")
        if lane.get("usable") is False:
            parts.append(f"UNUSABLE: {_text(lane.get('unusable_reason')) or DASH}")
        if parts:
            out.append(f"{name}: " + "; ".join(parts))
    return "\n".join(out)


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
    team = _obj(body.get("team"))
    if team:  # team mode: decisions on the team's usage, or on this daemon's own
        shared = team.get("ledger") == "shared"
        parts.append(f"team {_text(team.get('instance')) or DASH}: "
                     + ("shared" if shared else f"OWN VIEW ({_text(team.get('error')) or DASH})"))
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
            "  predicted need:  "
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
    lanes = format_lanes(_obj(body.get("lanes")))
    if lanes:
        out += ["", "lanes (what the providers report):", lanes]
    if debug:
        out += ["", "quota policy:", "", format_debug(models)]
    return "\n".join(out)


# --------------------------------------------------------------------------- talking to ccpd

def _error_message(raw: bytes) -> str | None:
    """``error.message`` of an Anthropic-shaped error body, if it is one."""
    try:
        doc = jsonparse.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:200] or None
    msg = _obj(_obj(doc).get("error")).get("message")
    return _text(msg)


def fetch_json(url: str, path: str, timeout: float = TIMEOUT_S):
    """GET ``url + path`` and parse it as JSON, raising :class:`CliError` for every failure."""
    import socket
    import urllib.error
    import urllib.request

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
        return jsonparse.loads(raw.decode("utf-8"))
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
    return "NO_COLOR" not in environ and _on_terminal(stream, environ)


# --------------------------------------------------------------------------- commands

def _on_terminal(stream, environ=None) -> bool:
    """Whether ``stream`` is a terminal that can take rich's layout (not ``TERM=dumb``)."""
    environ = os.environ if environ is None else environ
    if environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):
        return False


def _cli_rich():
    """:mod:`ccpd.cli.rich_view`, or None when rich is not installed (then: plain text)."""
    try:
        from ccpd.cli import rich_view as cli_rich
    except ImportError:
        return None
    return cli_rich


def _fetch_usage(url: str) -> dict:
    return check_usage_body(fetch_json(url, "/v1/usage"), url + "/v1/usage")


def cmd_status(args) -> int:
    url = resolve_url(args.url)
    if args.watch is not None:
        return watch_status(args, url)
    body = fetch_json(url, "/v1/usage")
    if args.json:
        _emit(json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False), sys.stdout)
        return EXIT_OK
    body = check_usage_body(body, url + "/v1/usage")
    rich_view = None if args.plain or not _on_terminal(sys.stdout) else _cli_rich()
    if rich_view is not None:
        rich_view.print_status(body, speeds=args.speeds, debug=args.debug_quota, url=url,
                               colour=use_colour(sys.stdout))
        return EXIT_OK
    _emit(format_status(body, speeds=args.speeds, debug=args.debug_quota,
                        colour=use_colour(sys.stdout), url=url), sys.stdout)
    return EXIT_OK


def watch_status(args, url: str) -> int:
    """``ccp status --watch``: refresh until Ctrl-C, which ends it cleanly (exit 0). On a
    terminal the view is redrawn in place (rich Live); elsewhere each refresh is printed as
    plain text after a blank line. A failed refresh is shown, and the watch goes on."""
    interval = args.watch
    rich_view = None if args.plain or not _on_terminal(sys.stdout) else _cli_rich()
    try:
        if rich_view is not None:
            rich_view.watch(lambda: _fetch_usage(url), interval, speeds=args.speeds,
                            debug=args.debug_quota, url=url, colour=use_colour(sys.stdout))
        else:
            first = True
            while True:
                try:
                    text = format_status(_fetch_usage(url), speeds=args.speeds,
                                         debug=args.debug_quota,
                                         colour=use_colour(sys.stdout), url=url)
                except CliError as e:
                    text = e.message
                _emit(text if first else "\n" + text, sys.stdout)
                first = False
                time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _watch_seconds(text: str) -> float:
    import argparse

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= seconds <= 86400:
        raise argparse.ArgumentTypeError("give between 0.1 and 86400 seconds")
    return seconds


def _add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="quota and usage per model, from a running ccpd",
                       description="Show what ccpd has counted per model: rolling and weekly "
                                   "quota use, headroom, warn/block state and calibration.")
    p.add_argument("--speeds", action="store_true",
                   help="add requests, output tokens/s and time-to-first-token columns")
    p.add_argument("--debug-quota", action="store_true",
                   help="add each model's reroute policy state below the table")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true",
                     help="print the daemon's /v1/usage answer as is")
    how.add_argument("--watch", nargs="?", const=WATCH_DEFAULT_S, type=_watch_seconds,
                     metavar="SECONDS",
                     help=f"refresh every SECONDS (default {WATCH_DEFAULT_S:g}) until Ctrl-C")
    p.add_argument("--plain", action="store_true",
                   help="plain text on a terminal too (what a pipe gets; no table layout)")
    p.add_argument("--url", metavar="URL",
                   help=f"ccpd base URL (default: ${URL_ENV} or {DEFAULT_URL})")
    p.set_defaults(func=cmd_status)


def cmd_statusline(args) -> int:
    from ccpd.cli import statusline

    colour = {"always": True, "never": False}.get(args.color)
    return statusline.run({"url": args.url, "timeout": args.timeout, "model": args.model,
                           "colour": colour})


def _add_statusline_parser(sub) -> None:
    from ccpd.cli.statusline import TIMEOUT_S as STATUSLINE_TIMEOUT_S

    p = sub.add_parser(
        "statusline", help="one line for Claude Code's status line (reads its JSON on stdin)",
        description="Print one short line about the model Claude Code is using (model.id of "
                    "the JSON on stdin): the lane that serves it now, the quota used (ccpd's "
                    "count and the provider's), when it resets, reroutes and cooldowns. Never "
                    "waits more than --timeout for the daemon; when it does not answer, says "
                    "so (`ccpd: not running`) and exits 0. Claude Code settings.json: "
                    '{"statusLine": {"type": "command", "command": "ccp statusline"}}')
    p.add_argument("--url", metavar="URL",
                   help=f"ccpd base URL (default: ${URL_ENV} or {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=STATUSLINE_TIMEOUT_S, metavar="SECONDS",
                   help=f"total time to wait for the daemon (default {STATUSLINE_TIMEOUT_S:g})")
    p.add_argument("--model", metavar="MODEL", help="the model to show instead of stdin's")
    colour = p.add_mutually_exclusive_group()
    colour.add_argument("--color", "--colour", dest="color", action="store_const",
                        const="always", help="ANSI colours (the default unless NO_COLOR is set)")
    colour.add_argument("--no-color", "--no-colour", dest="color", action="store_const",
                        const="never", help="no ANSI colours")
    p.set_defaults(func=cmd_statusline, color=None)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from ccpd.cli import db as cli_db
    parser = argparse.ArgumentParser(
        prog="ccp",
        description="Command-line client for ccpd, the local Anthropic API gateway: "
                    "`ccp status` and `ccp statusline` ask the running daemon (--url, else "
                    f"$CCP_URL, else {DEFAULT_URL}); `ccp db status|export|import` work on "
                    f"its store (--db PATH or --url URL, else ${cli_db.URL_ENV}, else "
                    f"${cli_db.DB_ENV}, else {cli_db.DEFAULT_DB}).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_status_parser(sub)
    _add_statusline_parser(sub)
    cli_db.add_db_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["statusline"]:
        # the fast path: no argparse, no store modules (see ccpd.cli.statusline); anything
        # unusual (--help, a typo) goes through argparse below
        from ccpd.cli import statusline
        opts = statusline.parse_args(argv[1:])
        if opts is not None:
            return statusline.run(opts)
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

"""``ccp statusline``: one short line for Claude Code's status line.

Claude Code runs the configured status-line command whenever the conversation changes and
pipes it a JSON object on stdin (``model.id``, ``session_id``, ``cwd``, ...; only ``model.id``
is read here, everything else is ignored). This asks the daemon for ``/v1/usage`` with a short
total deadline and prints one line about that model::

    zai ↪ anthropic · BLOCK · used 5h 85% · provider 5h 100% · cooldown 30m

- the lane that serves the model now: its route's preferred lane, or ``preferred ↪ secondary``
  when ccpd sends its requests to the secondary (cooldown, a blocking state, an unusable lane);
- ``WARN`` / ``BLOCK``: the model's state from all of ccpd's evidence;
- ``used``: ccpd's own count, the tighter of the rolling and weekly windows that have a limit;
- ``provider``: what the provider reports for the preferred lane (its tighter window);
- ``resets``: when the tightest of those windows resets; ``cooldown``: how long the model
  still cools down (hybrid mode);
- ``no quota`` for a model ccpd knows nothing about.

When the daemon does not answer in time, or answers something unusable, the line says so
calmly (``ccpd: not running``) and the exit code is still 0: a status line must never show a
traceback, and must never hang.

Speed matters (Claude Code runs this on every update): this module and :mod:`ccpd.cli`,
which loads it, import only the standard library -- no Twisted, no argparse on the usual
path, no ``rich``; ``http.client`` for the one GET.
``echo '{}' | python -X importtime -m ccpd.cli statusline`` shows what it loads; it answers
in about 50 ms (most of it the interpreter starting) when ccpd answers.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from ccpd import jsonparse
from ccpd.cli.common import _num, _obj, _text, resolve_url

TIMEOUT_S = 0.4        # total for the daemon: connect, request, answer
STDIN_TIMEOUT_S = 0.2  # Claude Code writes its JSON and closes stdin at once
STDIN_MAX = 1 << 20
BODY_MAX = 64 << 20    # a /v1/usage answer is tens of kilobytes
SEP = " · "
REROUTE = "↪"

# modest ANSI colours; Claude Code renders them in its status line
_RED, _YELLOW, _CYAN, _DIM, _RESET = "\033[31m", "\033[33m", "\033[36m", "\033[2m", "\033[0m"

# provider window names, shortened
_WINDOW_LABELS = {"five_hour": "5h", "seven_day": "7d", "weekly": "wk", "overage": "overage",
                  "seven_day_opus": "7d opus", "seven_day_sonnet": "7d sonnet"}


class Unavailable(Exception):
    """The daemon could not be asked; ``str()`` is the whole status line."""


# --------------------------------------------------------------------------- stdin

def read_session(stream=None, timeout: float = STDIN_TIMEOUT_S) -> dict:
    """Claude Code's JSON from ``stream`` (stdin): an object, or ``{}`` for a terminal, no
    input, invalid JSON or input that did not arrive within ``timeout``."""
    stream = sys.stdin if stream is None else stream
    try:
        if stream is None or stream.isatty():
            return {}
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return {}
    raw = _read_fd(fd, timeout)
    try:
        doc = jsonparse.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _read_fd(fd: int, timeout: float) -> bytes:
    import select

    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    while size < STDIN_MAX:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            ready, _, _ = select.select([fd], [], [], left)
        except (OSError, ValueError):  # not selectable (e.g. a file on some systems): read it
            ready = [fd]
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def session_model(session: dict) -> str | None:
    """``model.id`` of Claude Code's JSON (a bare string ``model`` is taken too)."""
    model = session.get("model")
    if isinstance(model, dict):
        model = model.get("id")
    return model.strip() if isinstance(model, str) and model.strip() else None


# --------------------------------------------------------------------------- the daemon

def fetch_usage(url: str, timeout: float = TIMEOUT_S) -> dict:
    """``GET url/v1/usage`` within ``timeout`` seconds in all (connect, TLS, request, every
    read: a daemon that trickles its answer is cut off too), or :class:`Unavailable` with the
    line to print."""
    import http.client  # here, not at the top: only this path needs it
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port in (-1, 0):
        raise Unavailable("ccpd: bad URL")
    connection_class = (http.client.HTTPSConnection if parts.scheme.lower() == "https"
                        else http.client.HTTPConnection)
    connection = connection_class(parts.hostname, port, timeout=timeout)
    try:
        with _deadline(timeout):
            connection.request("GET", parts.path.rstrip("/") + "/v1/usage",
                               headers={"Accept": "application/json",
                                        "User-Agent": "ccp-statusline"})
            response = connection.getresponse()
            status, body = response.status, response.read(BODY_MAX + 1)
    except ConnectionRefusedError:
        raise Unavailable("ccpd: not running") from None
    except TimeoutError:  # socket.timeout is TimeoutError
        raise Unavailable("ccpd: not answering") from None
    except (OSError, http.client.HTTPException, ValueError, UnicodeError):
        raise Unavailable("ccpd: unreachable") from None
    finally:
        connection.close()
    if status != 200:
        raise Unavailable(f"ccpd: HTTP {status}")
    if len(body) > BODY_MAX:
        raise Unavailable("ccpd: unexpected answer")
    try:
        doc = jsonparse.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Unavailable("ccpd: unexpected answer") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models", 0), (dict, type(None))):
        raise Unavailable("ccpd: unexpected answer")
    return doc


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in this (main) thread once ``seconds`` have passed: the socket's
    own timeout bounds each step, not the whole exchange."""
    def expired(_signum, _frame):
        raise TimeoutError("deadline passed")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- the line

def short_duration(seconds) -> str | None:
    """``45s``, ``30m``, ``4h59m``, ``4d23h`` (rounded up: a reset is never sooner than it
    says); None when unknown."""
    s = _num(seconds)
    if s is None or s < 0:
        return None
    s = int(-(-s // 1))
    if s < 60:
        return f"{s}s"
    minutes = -(-s // 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 24 * 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    hours = -(-minutes // 60)
    return f"{hours // 24}d{hours % 24}h"


def _pct(fraction: float) -> str:
    """Used percent, rounded down (99.96 % used is not 100 %): ``85%``."""
    return f"{int(round(fraction * 100, 6))}%"   # round(): 0.29 * 100 is 28.999999999999996


def _paint(text: str, code: str | None, colour: bool) -> str:
    return f"{code}{text}{_RESET}" if colour and code else text


def _level_colour(fraction: float, warn_at: float) -> str | None:
    if fraction >= 1.0:
        return _RED
    if fraction >= warn_at:
        return _YELLOW
    return None


def counted_windows(m: dict) -> list[tuple[float, str, float | None]]:
    """(used fraction, label, reset seconds) of each of ccpd's windows with a token limit."""
    out = []
    for name in ("rolling", "weekly"):
        w = _obj(m.get(name))
        used, limit = _num(w.get("used_tokens")), _num(w.get("limit_tokens"))
        headroom = _num(w.get("headroom_pct"))
        if limit and limit > 0 and used is not None:
            fraction = used / limit
        elif headroom is not None and limit:
            fraction = 1 - headroom / 100
        else:
            continue
        hours = _num(w.get("window_hours"))
        if name == "weekly" and (hours is None or hours == 168):
            label = "7d"
        elif hours is not None:
            label = f"{hours:g}h"
        else:
            label = name
        out.append((max(fraction, 0.0), label, _num(w.get("reset_eta_sec"))))
    return out


def provider_windows(readings: dict) -> list[tuple[float, str, float | None]]:
    """(utilization, label, reset seconds) of each provider window reading with a figure
    (a ``rejected`` window counts as fully used)."""
    out = []
    for window, reading in sorted(_obj(readings).items()):
        reading = _obj(reading)
        if reading.get("fresh") is False:
            continue
        utilization = _num(reading.get("utilization"))
        if reading.get("status") == "rejected":
            utilization = max(utilization or 0.0, 1.0)
        if utilization is None:
            continue
        out.append((max(utilization, 0.0), _WINDOW_LABELS.get(window, window),
                    _num(reading.get("reset_in_sec"))))
    return out


def _tightest(windows):
    return max(windows, key=lambda w: (w[0], w[2] or 0)) if windows else None


def serving_lane(m: dict, lanes: dict, mode: str | None) -> tuple[str | None, str | None, str]:
    """(preferred lane, lane requests go to now, why) -- what ccpd's policy would do with the
    next request of the model, from the state ``/v1/usage`` shows: ``why`` is ``cooldown``,
    ``unusable``, ``block``, ``headroom`` (hybrid: less room than a request needs) or ``""``."""
    policy = _obj(m.get("policy"))
    preferred = _text(policy.get("lane"))
    secondary = _text(policy.get("secondary"))
    secondary_lane = secondary.split("/", 1)[0] if secondary else None
    mode = _text(policy.get("mode")) or mode
    why = ""
    if policy.get("cooldown_active") is True:
        why = "cooldown"
    elif preferred and _obj(lanes.get(preferred)).get("usable") is False:
        why = "unusable"
    elif mode != "run2cap" and (m.get("block") is True or m.get("state") == "block"):
        why = "block"
    elif mode == "hybrid":
        headroom = _num(_obj(m.get("rolling")).get("headroom_tokens"))
        need = _num(policy.get("predicted_need_tokens"))
        if headroom is not None and need is not None and headroom < max(need, 1) \
                and _text(policy.get("last_decision")) == "rerouted_quota":
            why = "headroom"
    if why and secondary_lane:
        return preferred, secondary_lane, why
    return preferred, preferred, why


def _default_lane(body: dict) -> str | None:
    lane = _text(body.get("default_lane"))
    if lane:
        return lane
    lanes = list(_obj(body.get("lanes")))
    return lanes[0] if len(lanes) == 1 else None


def format_statusline(body: dict, model: str | None, colour: bool = False) -> str:
    """The one line for ``model`` (Claude Code's ``model.id``) from a ``/v1/usage`` body."""
    body = _obj(body)
    models = _obj(body.get("models"))
    lanes = _obj(body.get("lanes"))
    if not model:
        return _summary(models, colour)
    m = models.get(model)
    if not isinstance(m, dict):
        return f"{_default_lane(body) or 'default lane'}{SEP}no quota"

    preferred, lane, why = serving_lane(m, lanes, _text(body.get("reroute_mode")))
    warn_at = _num(m.get("warn_pct_auto")) or _num(m.get("warn_pct")) or 0.8
    parts = []
    if lane and preferred and lane != preferred:
        parts.append(f"{preferred} " + _paint(f"{REROUTE} {lane}", _CYAN, colour))
    else:
        parts.append(lane or "default lane")

    state = (_text(m.get("state")) or "").lower()
    if state == "block" or m.get("block") is True:
        parts.append(_paint("BLOCK", _RED, colour))
    elif state == "warn" or m.get("warn") is True:
        parts.append(_paint("WARN", _YELLOW, colour))
    if why == "unusable":
        reason = _text(_obj(lanes.get(preferred)).get("unusable_reason"))
        parts.append(_paint(f"{preferred} unusable" + (f" ({reason})" if reason else ""),
                            _RED, colour))

    counted = counted_windows(m)
    readings = _obj(m.get("provider")) or _obj(_obj(_obj(lanes.get(preferred))
                                                    .get("provider")).get("windows"))
    provided = provider_windows(readings)
    used, said = _tightest(counted), _tightest(provided)
    if used:
        parts.append(_paint(f"used {used[1]} {_pct(used[0])}",
                            _level_colour(used[0], warn_at), colour))
    if said:
        parts.append(_paint(f"provider {said[1]} {_pct(said[0])}",
                            _level_colour(said[0], warn_at), colour))
    if not used and not said:
        parts.append("no quota")

    policy = _obj(m.get("policy"))
    cooldown = (_num(policy.get("cooldown_remaining_sec"))
                if policy.get("cooldown_active") is True else None)
    tightest = _tightest([w for w in counted + provided if w[2] is not None])
    reset = tightest[2] if tightest else None
    if reset is not None and not (cooldown is not None and abs(cooldown - reset) < 60):
        text = short_duration(reset)
        if text:
            parts.append(f"resets {text}")
    if cooldown is not None:
        parts.append(_paint(f"cooldown {short_duration(cooldown) or '?'}", _YELLOW, colour))
    return SEP.join(parts)


def _summary(models: dict, colour: bool) -> str:
    """Without a model: which models are not ok, or that all are."""
    flagged = []
    for name in sorted(models):
        m = _obj(models[name])
        state = (_text(m.get("state")) or "").lower()
        if state in ("warn", "block"):
            flagged.append(_paint(f"{name} {state.upper()}",
                                  _RED if state == "block" else _YELLOW, colour))
    return "ccpd" + SEP + (", ".join(flagged) if flagged else "ok")


# --------------------------------------------------------------------------- the command

def parse_args(argv: list[str]) -> dict | None:
    """The options of ``ccp statusline`` by hand (argparse costs more than the rest of the
    command); None for anything else (``--help``, a typo): then argparse handles it."""
    opts = {"url": None, "timeout": TIMEOUT_S, "model": None, "colour": None}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("--url", "--timeout", "--model"):
            if not eq:
                if not args:
                    return None
                value = args.pop(0)
            if name == "--timeout":
                try:
                    value = float(value)
                except ValueError:
                    return None
                if not 0 < value <= 60:
                    return None
            opts[name[2:]] = value
        elif arg in ("--color", "--colour"):
            opts["colour"] = True
        elif arg in ("--no-color", "--no-colour"):
            opts["colour"] = False
        else:
            return None
    return opts


def run(opts: dict, stdin=None, stdout=None, environ=None) -> int:
    environ = os.environ if environ is None else environ
    stdout = sys.stdout if stdout is None else stdout
    colour = opts.get("colour")
    timeout = _num(opts.get("timeout"))
    timeout = TIMEOUT_S if timeout is None or timeout <= 0 else min(timeout, 60.0)
    if colour is None:
        colour = "NO_COLOR" not in environ
    try:
        model = opts.get("model") or session_model(read_session(stdin))
        try:
            body = fetch_usage(resolve_url(opts.get("url"), environ), timeout)
            line = format_statusline(body, model, colour=colour)
        except Unavailable as e:
            line = _paint(str(e), _DIM, colour)
    except Exception:  # noqa: BLE001 - a status line never shows a traceback
        line = "ccpd: error"
    try:
        try:
            stdout.write(line + "\n")
        except UnicodeEncodeError:
            stdout.write(line.replace(REROUTE, "->").replace(SEP, " | ")
                         .encode("ascii", "replace").decode("ascii") + "\n")
        stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass
    return 0

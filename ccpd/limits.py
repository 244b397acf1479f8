"""What a provider's answer says about its limits: which limit an error answer is, when it
lifts, and the utilisation a subscription reports on every answer.

Pure logic: no reactor, no I/O; ``now`` is passed in. Headers are a mapping of lower-case
names to values (the last value of each).

Classes of limit answers, and what each means for ccpd (docs/QUOTAS.md has the actions):

- ``window_exhausted`` — a plan window is used up: Anthropic's unified status ``rejected``
  (the window named by ``representative-claim``), Z.AI 1308 (5 h) and 1310 (weekly/monthly);
- ``burst`` — too much too fast, lifts within seconds or minutes: an Anthropic 429 without
  unified headers (API-key tiers' per-minute limits), Z.AI 1302 (concurrency);
- ``overloaded`` — the provider, not the plan: 529 ``overloaded_error``, Z.AI 1305;
- ``account`` — the plan cannot serve until someone acts: Z.AI 1113 (balance), 1313 (fair
  use), 401/403 on a lane that sends its own key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from email.utils import parsedate_to_datetime
from typing import Mapping

from ccpd import jsonparse

WINDOW_EXHAUSTED = "window_exhausted"
BURST = "burst"
OVERLOADED = "overloaded"
ACCOUNT = "account"
CLASSES = (WINDOW_EXHAUSTED, BURST, OVERLOADED, ACCOUNT)

# Provider window names (Anthropic's representative claims, and Z.AI's weekly cap).
FIVE_HOUR, SEVEN_DAY, WEEKLY, OVERAGE = "five_hour", "seven_day", "weekly", "overage"
WINDOWS = (FIVE_HOUR, SEVEN_DAY, "seven_day_opus", "seven_day_sonnet", WEEKLY, OVERAGE)

_ZAI_CLASSES = {"1308": (WINDOW_EXHAUSTED, FIVE_HOUR), "1310": (WINDOW_EXHAUSTED, WEEKLY),
                "1302": (BURST, None), "1305": (OVERLOADED, None),
                "1113": (ACCOUNT, None), "1313": (ACCOUNT, None)}
_UNIFIED = "anthropic-ratelimit-unified-"
_PER_MINUTE = tuple(f"anthropic-ratelimit-{kind}-"
                    for kind in ("requests", "tokens", "input-tokens", "output-tokens"))
_PER_MINUTE_RESETS = tuple(prefix + "reset" for prefix in _PER_MINUTE)
# A wall-clock time in a Z.AI message, English ("will reset at 2025-12-02 20:13:59") or
# Chinese ("将在 2025-12-02 20:13:59 重置").
_WALL_CLOCK = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?)")
_CODE_IN_MESSAGE = re.compile(r"^\s*\[(\d{3,5})\]")
# Anthropic's per-window headers use short names; the claims use long ones.
_CLAIM_PREFIX = {FIVE_HOUR: "5h", SEVEN_DAY: "7d", "seven_day_opus": "7d_opus",
                 "seven_day_sonnet": "7d_sonnet", OVERAGE: "overage"}


@dataclass(frozen=True)
class LimitAnswer:
    """One provider answer, classified. ``kind`` None: not a limit."""

    kind: str | None
    window: str | None = None        # the provider window, for window_exhausted
    reset_at: float | None = None    # epoch seconds when it lifts, when the answer says
    reset_source: str | None = None  # which header or message said so
    code: str | None = None          # Z.AI's business code, or Anthropic's error type
    message: str | None = None

    @property
    def quota_window(self) -> str | None:
        """ccpd's own quota window (``rolling``/``weekly``) this limit is evidence about."""
        if self.kind != WINDOW_EXHAUSTED or self.window in (None, OVERAGE):
            return None
        return "rolling" if self.window == FIVE_HOUR else "weekly"

    @property
    def label(self) -> str:
        """The class as usage lines and decisions name it: ``window_exhausted:five_hour``."""
        if self.kind is None:
            return "not_a_limit"
        return f"{self.kind}:{self.window}" if self.window else self.kind


NOT_A_LIMIT = LimitAnswer(None)


def _error_of(body: bytes) -> tuple[str | None, str | None, str | None]:
    """``(error type, business code, message)`` of an error body in either provider's shape."""
    try:
        answer = jsonparse.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None, None
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return None, None, None
    kind = error.get("type") if isinstance(error.get("type"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else None
    code = error.get("code")
    code = str(code) if isinstance(code, (str, int)) and not isinstance(code, bool) else None
    if not code and kind and kind.isdigit():  # Z.AI: {"type": "1308", ...}
        code = kind
    if not code and message and (found := _CODE_IN_MESSAGE.match(message)):
        code = found.group(1)  # Z.AI: "[1310] Weekly/Monthly Limit Exhausted..."
    return kind, code, message


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value == value and abs(value) != float("inf") \
        else None


def _wall_clock(text: str, zone: tzinfo) -> float | None:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).timestamp()


def reset_time(headers: Mapping[str, str], message: str | None, now: float,
               reset_tz: tzinfo = timezone.utc,
               window: str | None = None) -> tuple[float | None, str | None]:
    """``(epoch seconds, source)`` of when a limit lifts, from the most precise source there:
    Anthropic's unified reset (of ``window`` if it has its own), a wall-clock time in a Z.AI
    message (in ``reset_tz``), ``anthropic-ratelimit-*-reset``, ``retry-after-ms``,
    ``retry-after`` (seconds or an HTTP date)."""
    names = ([f"{_UNIFIED}{_CLAIM_PREFIX[window]}-reset"] if window in _CLAIM_PREFIX else [])
    for name in names + [_UNIFIED + "reset"]:
        if (when := _number(headers.get(name))) is not None:
            return when, name
    if message and (found := _WALL_CLOCK.search(message)):
        if (when := _wall_clock(found.group(1), reset_tz)) is not None:
            return when, "message"
    resets = [(when, name) for name in _PER_MINUTE_RESETS
              if (value := headers.get(name)) and (when := _wall_clock(value, timezone.utc))]
    if resets:
        return max(resets)
    if (millis := _number(headers.get("retry-after-ms"))) is not None and millis >= 0:
        return now + millis / 1000.0, "retry-after-ms"
    retry_after = (headers.get("retry-after") or "").strip()
    if retry_after:
        if (seconds := _number(retry_after)) is not None and seconds >= 0:
            return now + seconds, "retry-after"
        try:
            return parsedate_to_datetime(retry_after).timestamp(), "retry-after"
        except (TypeError, ValueError):
            pass
    return None, None


def classify(status: int, headers: Mapping[str, str], body: bytes, now: float,
             reset_tz: tzinfo = timezone.utc, owns_credentials: bool = False) -> LimitAnswer:
    """The class of one provider answer (status, lower-case headers, body)."""
    if status < 400:
        return NOT_A_LIMIT
    error_type, code, message = _error_of(body)
    kind = window = None
    if (headers.get(_UNIFIED + "status") or "").strip().lower() == "rejected":
        claim = (headers.get(_UNIFIED + "representative-claim") or "").strip().lower()
        kind, window = WINDOW_EXHAUSTED, claim if claim in WINDOWS else FIVE_HOUR
    elif code in _ZAI_CLASSES:
        kind, window = _ZAI_CLASSES[code]
    elif status == 529 or error_type == "overloaded_error":
        kind = OVERLOADED
    elif status in (401, 403) and owns_credentials:
        kind = ACCOUNT
    elif status == 429 or error_type == "rate_limit_error":
        kind = BURST  # per-minute tier limits, or a 429 that names no window
    if kind is None:
        return NOT_A_LIMIT
    reset_at, source = reset_time(headers, message, now, reset_tz, window)
    return LimitAnswer(kind, window, reset_at, source, code or error_type, message)


# -- utilisation, on every answer --------------------------------------------------------------

@dataclass(frozen=True)
class WindowUtilization:
    utilization: float | None    # 0-1 of the window, as the provider counts it
    reset_at: float | None
    status: str | None           # allowed, allowed_warning, rejected
    surpassed_threshold: float | None = None


@dataclass(frozen=True)
class ProviderUtilization:
    """What one answer's ``anthropic-ratelimit-unified-*`` headers say about the plan."""

    status: str | None
    reset_at: float | None
    representative_claim: str | None
    windows: dict[str, WindowUtilization] = field(default_factory=dict)  # five_hour, ...
    overage_status: str | None = None
    fallback_percentage: float | None = None


def window_name(short: str) -> str:
    """A provider window's name from its header infix: ``5h`` → ``five_hour``, ``7d`` →
    ``seven_day``; others (``7d_oi``, new ones) keep their infix."""
    for window, prefix in _CLAIM_PREFIX.items():
        if prefix == short:
            return window
    return short


_NOT_A_WINDOW = frozenset({"overage", "fallback", "representative"})


def read_utilization(headers: Mapping[str, str]) -> ProviderUtilization | None:
    """The unified rate-limit headers of an answer, or None when it has none. Windows are
    found by their ``<window>-utilization`` header, so a window Anthropic adds is read too; a
    value that does not parse is dropped on its own."""
    unified = {name[len(_UNIFIED):]: value for name, value in headers.items()
               if name.startswith(_UNIFIED)}
    if not unified:
        return None
    windows = {}
    for key in unified:
        short = key.removesuffix("-utilization")
        if short == key or short in _NOT_A_WINDOW:
            continue
        utilization = _number(unified[key])
        if utilization is None or utilization < 0:
            continue
        windows[window_name(short)] = WindowUtilization(
            utilization=utilization, reset_at=_number(unified.get(short + "-reset")),
            status=unified.get(short + "-status"),
            surpassed_threshold=_number(unified.get(short + "-surpassed-threshold")))
    return ProviderUtilization(
        status=unified.get("status"), reset_at=_number(unified.get("reset")),
        representative_claim=unified.get("representative-claim"), windows=windows,
        overage_status=unified.get("overage-status"),
        fallback_percentage=_number(unified.get("fallback-percentage")))

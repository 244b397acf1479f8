"""Which lane serves a request: the reroute policy, provider limit answers and their reset times.

Pure logic: no reactor, no I/O; ``now`` is passed in. The proxy asks :meth:`Policy.decide`
before sending, and :meth:`Policy.after_limit` when the lane answered with a limit before any
byte reached the client.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from email.utils import parsedate_to_datetime

from ccpd.config import Route
from ccpd.quotas import QuotaState

MODES = ("preemptive", "run2cap", "hybrid")

PREFERRED = "preferred"
REROUTED_QUOTA = "rerouted_quota"
REROUTED_LIMIT = "rerouted_limit"
REROUTED_COOLDOWN = "rerouted_cooldown"
BLOCKED = "blocked"


def limit_window(status: int, error_type: str | None) -> str | None:
    """The quota window a provider's answer says is exhausted (``rolling``/``weekly``), or
    None when the answer is not a limit. Z.AI: 1308 is its 5-hour cap, 1310 its weekly cap."""
    if error_type == "1310":
        return "weekly"
    if error_type == "1308" or status == 429 or error_type == "rate_limit_error":
        return "rolling"
    return None


_ZAI_RESET = re.compile(r"reset(?:s)? at (\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?)")
_RATELIMIT_RESETS = ("anthropic-ratelimit-tokens-reset", "anthropic-ratelimit-input-tokens-reset",
                     "anthropic-ratelimit-output-tokens-reset",
                     "anthropic-ratelimit-requests-reset")


def _epoch(text: str, default_tz: tzinfo) -> float | None:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=default_tz)
    return moment.timestamp()


def observed_reset(headers: dict[str, str], message: str | None, now: float,
                   reset_tz: tzinfo = timezone.utc) -> float | None:
    """When the provider says its limit lifts (epoch seconds), from the most precise source
    present: Z.AI's "reset at <wall-clock time>" (in the lane's ``reset_tz``), Anthropic's
    ``anthropic-ratelimit-*-reset`` headers, then ``retry-after`` (seconds or an HTTP date)."""
    if message:
        found = _ZAI_RESET.search(message)
        if found and (when := _epoch(found.group(1), reset_tz)) is not None:
            return when
    resets = [when for name in _RATELIMIT_RESETS
              if (value := headers.get(name)) and (when := _epoch(value, timezone.utc))]
    if resets:
        return max(resets)
    retry_after = (headers.get("retry-after") or "").strip()
    if retry_after.isdigit():
        return now + int(retry_after)
    if retry_after:
        try:
            return parsedate_to_datetime(retry_after).timestamp()
        except (TypeError, ValueError):
            return None
    return None


@dataclass(frozen=True)
class Decision:
    """Where one request goes, and why; the fields of its usage line and decision log."""

    lane: str
    model: str
    decision: str
    reason: str = ""
    attempt: int = 0
    preferred_attempt: bool = True
    cooldown_active: bool = False
    cooldown_next_ts: float | None = None

    @property
    def rerouted(self) -> bool:
        return self.decision not in (PREFERRED, BLOCKED)


class Policy:
    """The reroute policy of SPEC.md: ``preemptive``, ``run2cap`` or ``hybrid``."""

    def __init__(self, mode: str, cooldown_sec: float):
        if mode not in MODES:
            raise ValueError(f"reroute mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.cooldown_sec = cooldown_sec
        self.cooldowns: dict[str, float] = {}     # model -> epoch when its cooldown ends
        self.overshoot_at: dict[str, float] = {}  # model -> epoch of the last overshoot attempt
        self.last: dict[str, Decision] = {}

    def cooldown_until(self, model: str, now: float) -> float | None:
        until = self.cooldowns.get(model)
        if until is not None and until <= now:
            del self.cooldowns[model]
            return None
        return until

    def decide(self, route: Route, preferred: QuotaState, secondary: QuotaState | None,
               now: float, headroom_tokens: int | None = None) -> Decision:
        """The lane for a request to ``route.model``.

        ``headroom_tokens`` is the calibrated room left on the preferred lane (None: no limit);
        ``secondary`` is the standing of the secondary model, when the route has one.
        """
        decision = self._decide(route, preferred, secondary, now, headroom_tokens)
        self.last[route.model] = decision
        return decision

    def _decide(self, route, preferred, secondary, now, headroom_tokens) -> Decision:
        model = route.model
        until = self.cooldown_until(model, now) if self.mode == "hybrid" else None
        if until is not None and route.secondary_lane:
            return self._reroute(route, secondary, REROUTED_COOLDOWN,
                                 f"preferred lane cooling down for {until - now:.0f}s",
                                 preferred_attempt=False, cooldown_next_ts=until)
        preferred_decision = Decision(route.lane, model, PREFERRED,
                                      cooldown_active=until is not None, cooldown_next_ts=until)
        if self.mode == "run2cap":
            return preferred_decision
        if self.mode == "preemptive":
            if not preferred.blocked:
                return preferred_decision
            reason = f"quota blocks {model} ({preferred.state})"
        else:
            need = max(preferred.predicted_need, 1)
            short = headroom_tokens is not None and headroom_tokens < need
            if not short and not preferred.blocked:
                return preferred_decision
            reason = (f"headroom {headroom_tokens} tokens < predicted need {need}"
                      if short else f"quota blocks {model}")
            last = self.overshoot_at.get(model)
            # one overshoot per cooldown window; with no cooldown there is no window, and no
            # overshoot: hybrid then reroutes as soon as the headroom is short
            if self.cooldown_sec > 0 and (last is None or now - last >= self.cooldown_sec):
                self.overshoot_at[model] = now
                return Decision(route.lane, model, PREFERRED, f"overshoot attempt: {reason}",
                                cooldown_active=until is not None, cooldown_next_ts=until)
        if not route.secondary_lane:
            return Decision(route.lane, model, BLOCKED, f"{reason}; no secondary lane",
                            preferred_attempt=False)
        return self._reroute(route, secondary, REROUTED_QUOTA, reason, preferred_attempt=False)

    def after_limit(self, route: Route, secondary: QuotaState | None, now: float,
                    window: str) -> Decision | None:
        """The preferred lane answered with a ``window`` limit before any byte reached the
        client: the reroute to make, or None to pass the answer on (no lane left)."""
        until = None
        if self.mode == "hybrid" and self.cooldown_sec > 0:
            until = self.cooldowns[route.model] = now + self.cooldown_sec
        if not route.secondary_lane:
            return None
        decision = self._reroute(route, secondary, REROUTED_LIMIT,
                                 f"preferred lane answered with its {window} limit",
                                 preferred_attempt=True, cooldown_next_ts=until)
        if decision.decision == BLOCKED:
            return None
        self.last[route.model] = decision
        return decision

    def _reroute(self, route: Route, secondary: QuotaState | None, kind: str, reason: str, *,
                 preferred_attempt: bool, cooldown_next_ts: float | None = None) -> Decision:
        target = route.secondary_model or route.model
        if self.mode != "run2cap" and secondary is not None and secondary.blocked:
            return Decision(route.lane, route.model, BLOCKED,
                            f"{reason}; secondary {target} is blocked by its quota too",
                            preferred_attempt=False, cooldown_next_ts=cooldown_next_ts,
                            cooldown_active=cooldown_next_ts is not None)
        return Decision(route.secondary_lane, target, kind, reason, attempt=1,
                        preferred_attempt=preferred_attempt,
                        cooldown_active=cooldown_next_ts is not None,
                        cooldown_next_ts=cooldown_next_ts)

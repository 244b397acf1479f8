"""Which lane serves a request: the reroute policy of SPEC.md.

Pure logic: no reactor, no I/O; ``now`` is passed in. The governor asks :meth:`Policy.decide`
before sending, and :meth:`Policy.after_limit` when the lane answered with a limit before any
byte reached the client (:mod:`ccpd.limits` says which limit it was).

A standing (``preferred``, ``secondary``) is anything with ``state`` (ok/warn/block),
``blocked`` and ``predicted_need``: a model's :class:`~ccpd.quotas.QuotaState`, or a
:class:`Standing`, the governor's combination of every piece of evidence about a lane.
"""
from __future__ import annotations

from dataclasses import dataclass

from ccpd.config import Route

MODES = ("preemptive", "run2cap", "hybrid")

PREFERRED = "preferred"
REROUTED_QUOTA = "rerouted_quota"
REROUTED_LIMIT = "rerouted_limit"
REROUTED_COOLDOWN = "rerouted_cooldown"
BLOCKED = "blocked"


@dataclass(frozen=True)
class Standing:
    """A lane's standing for one model at one moment: the worst of every piece of evidence.

    ``source`` says which evidence decided: ``provider`` (a fresh provider reading), ``plan``
    (ccpd's count against the lane's limit), ``model`` (against the model's limit), or
    ``none`` (nothing limits it)."""

    state: str
    source: str
    reason: str
    predicted_need: int

    @property
    def blocked(self) -> bool:
        return self.state == "block"


def _why(standing) -> str:
    """What a blocked standing says about itself (the governor's names its evidence)."""
    return getattr(standing, "reason", "") or standing.state


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

    def decide(self, route: Route, preferred, secondary,
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
            reason = f"quota blocks {model} ({_why(preferred)})"
        else:
            need = max(preferred.predicted_need, 1)
            short = headroom_tokens is not None and headroom_tokens < need
            if not short and not preferred.blocked:
                return preferred_decision
            reason = (f"headroom {headroom_tokens} tokens < predicted need {need}"
                      if short else f"quota blocks {model} ({_why(preferred)})")
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

    def after_limit(self, route: Route, secondary, now: float, reason: str,
                    cooldown_until: float | None = None) -> Decision | None:
        """The preferred lane answered with a limit (``reason`` names it) before any byte
        reached the client: the reroute to make, or None to pass the answer on (no lane
        left). ``cooldown_until``: the preferred model cools down until then (hybrid)."""
        until = None
        if self.mode == "hybrid" and cooldown_until is not None and cooldown_until > now:
            until = self.cooldowns[route.model] = cooldown_until
        if not route.secondary_lane:
            return None
        decision = self._reroute(route, secondary, REROUTED_LIMIT, reason,
                                 preferred_attempt=True, cooldown_next_ts=until)
        if decision.decision == BLOCKED:
            return None
        self.last[route.model] = decision
        return decision

    def reroute(self, route: Route, secondary, kind: str, reason: str) -> Decision:
        """A reroute the governor decided on (a lane that cannot serve); BLOCKED when the
        secondary is blocked too."""
        decision = self._reroute(route, secondary, kind, reason, preferred_attempt=False)
        self.last[route.model] = decision
        return decision

    def _reroute(self, route: Route, secondary, kind: str, reason: str, *,
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

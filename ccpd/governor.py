"""Quota governance: where each request goes, from the best evidence there is.

Evidence about a lane, most precise first: what the provider itself says (the utilisation it
reports on every answer, its limit answers, its quota endpoint: :mod:`ccpd.evidence`), then
ccpd's own token counts held against the limits of ``quotas.json`` — per lane (the plan) and
per model (the user's budgets); the tighter decides. The proxy asks :meth:`Governor.decide`
before sending, hands every answer's headers to its :class:`~ccpd.watch.ProviderWatch`
(``governor.watch``), the classified limit answers to :meth:`Governor.after_limit` and every
finished exchange to :meth:`Governor.account`. The JSON views of this state are in
:mod:`ccpd.web.views`.
"""
from __future__ import annotations

import math

from twisted.logger import Logger

from ccpd.calibration import Calibration
from ccpd.config import Config, Route
from ccpd.evidence import ProviderEvidence
from ccpd.limits import ACCOUNT, OVERLOADED, WINDOW_EXHAUSTED, LimitAnswer
from ccpd.metrics import Metrics
from ccpd.policy import PREFERRED, REROUTED_LIMIT, Decision, Policy, Standing
from ccpd.quotas import ModelQuota, QuotaEngine, QuotaState, Quotas, load_quotas
from ccpd.watch import ProviderWatch

log = Logger()

_STATES = ("ok", "warn", "block")  # in order of severity


class Governor:
    def __init__(self, config: Config, quotas: Quotas | dict, metrics: Metrics, clock,
                 keep=None):
        """``keep``, when given, keeps state across restarts: ``save_cooldown(model, until)``
        and ``save_reading(reading)`` (the store; :meth:`restore` reads it back)."""
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.keep = keep
        self.quota_file = config.quotas_file
        self.engine = QuotaEngine(quotas)                        # per model
        self.plans = QuotaEngine(getattr(quotas, "lanes", {}))   # per lane: the plan
        self.evidence = ProviderEvidence(config.routing.provider_max_age,
                                         config.routing.block_at)
        self.policy = Policy(config.routing.reroute_mode, config.routing.cooldown_sec)
        self.watch = ProviderWatch(self.evidence, self.plans, metrics, clock, keep)
        self.calibration = Calibration()
        self.quotas_loaded_at = clock.seconds()
        self.team = None  # team mode: the ccpd.team.TeamLedger decisions sync with first

    def restore(self, cooldowns: dict[str, float], usage_rows, readings=()) -> None:
        """Resume after a restart: the cooldowns still running, the provider readings, and
        the quota windows rebuilt from stored samples (:meth:`record_samples`)."""
        self.policy.cooldowns.update(cooldowns)
        self.watch.restore(readings)
        self.record_samples(usage_rows)
        self.update_gauges(self.clock.seconds())
        if cooldowns or usage_rows or readings:
            log.info("restored {rows} stored samples into the quota windows, {cooldowns} "
                     "cooldowns and {readings} provider readings", rows=len(usage_rows),
                     cooldowns=len(cooldowns), readings=len(readings))

    def record_samples(self, usage_rows) -> None:
        """Count stored samples ``(model, ts, input, output, cache_creation, cache_read,
        seconds, lane, ...)`` into the quota windows (:func:`ccpd.store.queries.recent_usage`
        rows: after a restart, and the team's samples in team mode)."""
        for model, ts, input_tokens, output_tokens, creation, read, seconds, lane, *_ \
                in usage_rows:
            tokens = dict(input_tokens=input_tokens, output_tokens=output_tokens,
                          cache_creation_input_tokens=creation, cache_read_input_tokens=read)
            self.engine.record(model, ts, seconds=seconds, **tokens)
            if lane:
                self.plans.record(lane, ts, seconds=seconds, **tokens)

    # -- quotas ----------------------------------------------------------------------------------

    def reload(self) -> Quotas:
        """Re-read the quotas file; on any error (:class:`QuotaError`) the old quotas stay.
        A reload also gives every lane marked unusable another chance."""
        quotas = load_quotas(self.quota_file)
        self.engine.set_quotas(quotas)
        self.plans.set_quotas(quotas.lanes)
        self.quotas_loaded_at = self.clock.seconds()
        for lane in list(self.evidence.unusable):
            self.watch.mark_usable(lane, "quotas reloaded")
        log.info("quotas reloaded from {path}: {count} models, {lanes} lanes",
                 path=self.quota_file, count=len(quotas), lanes=len(quotas.lanes))
        self.update_gauges(self.clock.seconds())
        return quotas

    def state(self, model: str, now: float) -> QuotaState:
        return self._standing(model, now)[0]

    def _standing(self, model: str, now: float):
        """``(state, auto warn)`` of ``model``: its quota state judged by the calibrated warn
        threshold, and that calibration (None without a quota)."""
        warn = self.auto_warn(model)
        return self.engine.state(model, now, warn.warn_pct_auto if warn else None), warn

    def auto_warn(self, model: str):
        quota = self.engine.quotas.get(model)
        if quota is None:
            return None
        return self.calibration.auto_warn(model, quota.warn_pct, quota.rolling_window_hours * 3600)

    # -- evidence --------------------------------------------------------------------------------

    def standing(self, lane: str, model: str, now: float, counted=None) -> Standing:
        """Every piece of evidence about ``model`` on ``lane``; the worst state decides. A
        fresh provider reading of a window stands in for ccpd's count of the lane's plan
        limit of that window (the provider counts traffic ccpd never sees); the model's
        limits are the user's budgets and always count. ``counted``: the model's
        ``(state, auto warn)`` when the caller has it already."""
        model_state, warn = counted or self._standing(model, now)
        candidates = [(model_state.state, "model", f"quota of {model}: {model_state.state}")]
        # the provider's figure warns at the plan's warn_pct, else the model's (calibrated)
        warn_at = (self.plans.quotas[lane].warn_pct if lane in self.plans.quotas else
                   warn.warn_pct_auto if warn else ModelQuota.warn_pct)
        provider, provider_reason, covered = self.evidence.judge(lane, now, warn_at)
        if provider != "ok":
            candidates.append((provider, "provider", provider_reason))
        if lane in self.plans.quotas:
            plan = self.plans.state(lane, now)
            for window in plan.windows:
                here = plan.window_state(window)
                if window.name not in covered and here != "ok":
                    candidates.append((here, "plan", f"{window.name} plan limit of lane {lane}"
                                                     f": {here}"))
        state, source, reason = max(candidates, key=lambda c: _STATES.index(c[0]))
        if state == "ok":  # all clear: name the best evidence that says so
            source = ("provider" if covered or self.evidence.fresh(lane, now) else
                      "plan" if lane in self.plans.quotas else
                      "model" if model_state.quota is not None else "none")
            reason = ""
        return Standing(state, source, reason, model_state.predicted_need)

    # -- decisions -------------------------------------------------------------------------------

    def _governed(self, route: Route) -> bool:
        """Whether anything could keep a request of ``route`` from its preferred lane."""
        return (route.secondary_lane is not None or route.model in self.engine.quotas
                or route.lane in self.plans.quotas or bool(self.evidence.readings))

    def _secondary_standing(self, route: Route, now: float) -> Standing | None:
        if not route.secondary_lane:
            return None
        return self.standing(route.secondary_lane, route.secondary_model or route.model, now)

    def decide(self, route: Route) -> Decision:
        if not self._governed(route):
            return Decision(route.lane, route.model, PREFERRED)  # nothing limits it
        now = self.clock.seconds()
        unusable = self.evidence.unusable.get(route.lane)
        if unusable and route.secondary_lane and \
                route.secondary_lane not in self.evidence.unusable:
            decision = self.policy.reroute(route, self._secondary_standing(route, now),
                                           REROUTED_LIMIT, f"account: lane {route.lane} cannot "
                                                           f"serve ({unusable})")
        else:
            state, warn = self._standing(route.model, now)
            standing = self.standing(route.lane, route.model, now, (state, warn))
            headroom = self._headroom(route.lane, route.model, state, warn, now)
            decision = self.policy.decide(route, standing, self._secondary_standing(route, now),
                                          now, headroom)
            if decision.decision == PREFERRED and standing.state != "ok":
                self.metrics.preferred_attempt.labels(route.model, route.lane).inc()
        if decision.decision != PREFERRED or decision.reason:
            self._log_decision(route, decision, now)
        if decision.rerouted:
            self.metrics.rerouted.labels(route.model, self.policy.mode).inc()
        return decision

    def _headroom(self, lane: str, model: str, state: QuotaState, warn, now: float) -> int | None:
        """Tokens left before the first limit: the model's (calibrated) limits, and the
        provider's figure times the limit it implies, when both are known."""
        multiplier = warn.limit_multiplier if warn else 1.0
        rooms = [max(0, math.floor(w.limit_tokens * multiplier) - w.used_tokens)
                 for w in state.windows if w.limit_tokens is not None]
        for window, reading in self.evidence.fresh(lane, now).items():
            learned = self.evidence.learned_limit(lane, window)
            if learned is not None and reading.utilization is not None:
                rooms.append(max(0, math.floor((self.evidence.block_at - reading.utilization)
                                               * learned.tokens)))
        return min(rooms) if rooms else None

    def after_limit(self, route: Route, lane: str, answer: LimitAnswer,
                    wasted_seconds: float) -> Decision | None:
        """The preferred ``lane`` answered with a limit before any byte reached the client.
        Each class has its own action (docs/QUOTAS.md); returns the reroute to make, or None
        when the answer goes to the client."""
        now = self.clock.seconds()
        self.metrics.limit_answers.labels(lane, answer.kind).inc()
        self.metrics.wasted_retry.labels(route.model).inc(max(0.0, wasted_seconds))
        if answer.kind == OVERLOADED:
            return None  # the provider's trouble, not the plan's: the client retries
        until = None
        if answer.kind == ACCOUNT:
            self.watch.mark_unusable(lane, answer.label + (f" {answer.code}" if answer.code
                                                           else ""), answer.message)
        elif answer.kind == WINDOW_EXHAUSTED:
            until = self._window_exhausted(route, lane, answer, now)
        reason = f"preferred lane answered {answer.label}"
        if answer.reset_at is not None and answer.kind != ACCOUNT:
            reason += f" (lifts in {max(0, answer.reset_at - now):.0f}s, {answer.reset_source})"
        decision = self.policy.after_limit(route, self._secondary_standing(route, now), now,
                                           reason, until)
        if until is not None and self.keep is not None and \
                self.policy.cooldowns.get(route.model) == until:
            self.keep.save_cooldown(route.model, until)
        self._log_decision(route, decision or Decision(route.lane, route.model, PREFERRED,
                                                       f"{reason}; no lane left"), now)
        if decision is not None:
            self.metrics.rerouted.labels(route.model, self.policy.mode).inc()
        return decision

    def _window_exhausted(self, route: Route, lane: str, answer: LimitAnswer,
                          now: float) -> float | None:
        """A plan window is used up: one calibration sample, the provider's word kept as a
        reading (the lane is blocked until the reset), and the cooldown's end."""
        window = answer.quota_window or "rolling"
        state = self.state(route.model, now)
        current = state.rolling if window == "rolling" else state.weekly
        self.calibration.observe_limit(
            route.model, window, now, current.reset_eta_sec, answer.reset_at,
            None if not current.limit_tokens else current.used_tokens / current.limit_tokens)
        if answer.window and answer.reset_at is not None and answer.reset_at > now:
            self.watch.used_up(lane, answer.window, answer.reset_at, now)
        if answer.reset_at is not None and answer.reset_at > now:
            return answer.reset_at
        return now + self.policy.cooldown_sec if self.policy.cooldown_sec > 0 else None

    def retry_after(self, route: Route) -> int:
        """Whole seconds until some lane of ``route`` has room for a typical request (the
        preferred lane also not before its cooldown ends)."""
        now = self.clock.seconds()

        def wait_for(lane: str, model: str) -> float:
            need = max(self.engine.state(model, now).predicted_need, 1)
            waits = [self.engine.seconds_until_room(model, need, now)]
            waits += [reading.reset_at - now for reading in self.evidence.fresh(lane, now)
                      .values() if reading.reset_at is not None and self.evidence.blocks(reading)]
            return max(waits)

        until = self.policy.cooldown_until(route.model, now)
        waits = [max(wait_for(route.lane, route.model), until - now if until else 0.0)]
        if route.secondary_lane:
            waits.append(wait_for(route.secondary_lane, route.secondary_model or route.model))
        return max(1, math.ceil(min(waits)))

    def _log_decision(self, route: Route, decision: Decision, now: float) -> None:
        until = decision.cooldown_next_ts
        standing = self.standing(route.lane, route.model, now)
        headroom = self.state(route.model, now).headroom_pct
        log.info("reroute_policy {model}: {reroute_decision} -> {lane}/{served_model} "
                 "[quota {quota_state}, headroom {headroom_pct}%]{reason_text}",
                 decision="reroute_policy", mode=self.policy.mode, quota_state=standing.state,
                 evidence=standing.source, model=route.model,
                 reroute_decision=decision.decision, lane=decision.lane,
                 served_model=decision.model, attempt=decision.attempt,
                 reason=decision.reason,
                 reason_text=f" ({decision.reason})" if decision.reason else "",
                 headroom_pct=headroom,
                 cooldown_remaining_sec=max(0.0, round(until - now, 1)) if until else 0.0)

    def usage_fields(self, model: str, lane: str, decision: Decision | None) -> dict:
        """The policy and quota fields of a usage line, after the request was accounted."""
        fields = {}
        now = self.clock.seconds()
        if model in self.engine.quotas:
            state = self.state(model, now)
            fields = {"quota_headroom_pct": state.headroom_pct,
                      "headroom_pct_rolling": state.rolling.headroom_pct,
                      "headroom_pct_weekly": state.weekly.headroom_pct,
                      "quota_warn_threshold": state.warn_pct, "warn_pct_auto": state.warn_pct,
                      **self.calibration.gap_stats(model, "rolling")}
        if lane:
            fields.update(self.watch.usage_fields(lane, now))
        if decision is not None:
            fields.update(reroute_decision=decision.decision, decision_reason=decision.reason,
                          reroute_attempt=decision.attempt,
                          preferred_attempt=decision.preferred_attempt,
                          cooldown_active=decision.cooldown_active,
                          cooldown_next_ts=decision.cooldown_next_ts)
        return fields

    # -- accounting ------------------------------------------------------------------------------

    def account(self, model: str, lane: str, usage, *, seconds: float, stream_seconds: float,
                ttft_seconds: float | None) -> None:
        """Count a finished request's tokens against ``model`` (the model the lane was asked
        for) and against ``lane``'s plan."""
        now = self.clock.seconds()
        tokens = dict(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                      cache_creation_input_tokens=usage.cache_creation_input_tokens,
                      cache_read_input_tokens=usage.cache_read_input_tokens)
        self.engine.record(model, now, seconds=seconds, stream_seconds=stream_seconds,
                           ttft_seconds=ttft_seconds, **tokens)
        if lane:
            self.plans.record(lane, now, seconds=seconds, **tokens)
        if model in self.engine.quotas or lane in self.plans.quotas:
            self.update_gauges(now, [model], [lane])

    def update_gauges(self, now: float, models=None, lanes=None) -> None:
        """The headroom gauges of ``models`` and ``lanes`` (None: all with a quota)."""
        for engine, names, gauge in ((self.engine, models, self.metrics.quota_headroom),
                                     (self.plans, lanes, self.metrics.plan_headroom)):
            for name in names if names is not None else list(engine.quotas):
                if name not in engine.quotas:
                    continue
                for window in engine.state(name, now).windows:
                    if window.limit_tokens:
                        gauge.labels(name, window.name).set(
                            window.headroom_tokens / window.limit_tokens)

"""Quota governance for the proxy: the quota engine, the reroute policy and calibration bound to
the clock, the metrics and the daemon log, and the calibration sampler service.

The proxy asks :meth:`Governor.decide` before sending a Messages request, tells it about limit
answers (:meth:`Governor.after_limit`) and about every finished exchange
(:meth:`Governor.account`); the usage endpoints read :meth:`Governor.usage_view`.
"""
from __future__ import annotations

import math
import os

from twisted.application.internet import TimerService
from twisted.logger import Logger

from ccpd.calibration import Calibration, read_probe_results
from ccpd.config import Config, Route
from ccpd.metrics import Metrics
from ccpd.policy import PREFERRED, Decision, Policy, limit_window, observed_reset
from ccpd.quotas import ModelQuota, QuotaEngine, QuotaState, load_quotas

log = Logger()


class Governor:
    def __init__(self, config: Config, quotas: dict[str, ModelQuota], metrics: Metrics, clock):
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.quota_file = config.quotas_file
        self.engine = QuotaEngine(quotas)
        self.policy = Policy(config.routing.reroute_mode, config.routing.cooldown_sec)
        self.calibration = Calibration()
        self.quotas_loaded_at = clock.seconds()
        self._probe_mtime: float | None = None
        self.on_cooldown = None  # called with (model, until) when a cooldown starts

    def restore(self, cooldowns: dict[str, float], usage_rows) -> None:
        """Resume after a restart: the cooldowns still running and the quota windows rebuilt
        from stored samples ``(model, ts, input, output, cache_creation, cache_read, seconds)``."""
        self.policy.cooldowns.update(cooldowns)
        for model, ts, input_tokens, output_tokens, creation, read, seconds in usage_rows:
            self.engine.record(model, ts, input_tokens=input_tokens, output_tokens=output_tokens,
                               cache_creation_input_tokens=creation,
                               cache_read_input_tokens=read, seconds=seconds)
        self._update_gauges(self.clock.seconds())
        if cooldowns or usage_rows:
            log.info("restored {rows} stored samples into the quota windows and {cooldowns} "
                     "cooldowns", rows=len(usage_rows), cooldowns=len(cooldowns))

    # -- quotas ----------------------------------------------------------------------------------

    def reload(self) -> dict[str, ModelQuota]:
        """Re-read the quotas file; on any error (:class:`QuotaError`) the old quotas stay."""
        quotas = load_quotas(self.quota_file)
        self.engine.set_quotas(quotas)
        self.quotas_loaded_at = self.clock.seconds()
        log.info("quotas reloaded from {path}: {count} models", path=self.quota_file,
                 count=len(quotas))
        self._update_gauges(self.clock.seconds())
        return quotas

    def state(self, model: str, now: float) -> QuotaState:
        return self._standing(model, now)[0]

    def _standing(self, model: str, now: float):
        """``(state, auto warn)`` of ``model``: its quota state judged by the calibrated warn
        threshold, and that calibration (None without a quota)."""
        warn = self._auto_warn(model)
        return self.engine.state(model, now, warn.warn_pct_auto if warn else None), warn

    def _auto_warn(self, model: str):
        quota = self.engine.quotas.get(model)
        if quota is None:
            return None
        return self.calibration.auto_warn(model, quota.warn_pct, quota.rolling_window_hours * 3600)

    @staticmethod
    def _calibrated_headroom(state: QuotaState, warn) -> int | None:
        """Tokens left before the provider's (calibrated) limit, the lower of both windows."""
        multiplier = warn.limit_multiplier if warn else 1.0
        rooms = [max(0, math.floor(w.limit_tokens * multiplier) - w.used_tokens)
                 for w in state.windows if w.limit_tokens is not None]
        return min(rooms) if rooms else None

    # -- policy ----------------------------------------------------------------------------------

    def _secondary_state(self, route: Route, now: float) -> QuotaState | None:
        if not route.secondary_lane:
            return None
        return self.state(route.secondary_model or route.model, now)

    def decide(self, route: Route) -> Decision:
        if route.secondary_lane is None and route.model not in self.engine.quotas:
            return Decision(route.lane, route.model, PREFERRED)  # no quota, nowhere to go
        now = self.clock.seconds()
        state, warn = self._standing(route.model, now)
        decision = self.policy.decide(route, state, self._secondary_state(route, now), now,
                                      self._calibrated_headroom(state, warn))
        if decision.decision == PREFERRED and state.state != "ok":
            self.metrics.preferred_attempt.labels(route.model, route.lane).inc()
        if decision.decision != PREFERRED or decision.reason or state.state != "ok":
            self._log_decision(route, decision, state, now)
        if decision.rerouted:
            self.metrics.rerouted.labels(route.model, self.policy.mode).inc()
        return decision

    def after_limit(self, route: Route, lane, status: int, error_type: str | None,
                    headers: dict[str, str], message: str | None,
                    wasted_seconds: float) -> Decision | None:
        """The preferred lane answered with a limit: feed calibration, start the cooldown, and
        return the reroute to make (None: no lane left, the answer goes to the client)."""
        now = self.clock.seconds()
        window = limit_window(status, error_type) or "rolling"
        state = self.state(route.model, now)
        current = state.rolling if window == "rolling" else state.weekly
        reset = observed_reset(headers, message, now, lane.config.reset_tzinfo)
        self.calibration.observe_limit(
            route.model, window, now, current.reset_eta_sec, reset,
            None if not current.limit_tokens else current.used_tokens / current.limit_tokens)
        self.metrics.wasted_retry.labels(route.model).inc(max(0.0, wasted_seconds))
        decision = self.policy.after_limit(route, self._secondary_state(route, now), now, window)
        until = self.policy.cooldowns.get(route.model)
        if self.on_cooldown is not None and until is not None and until > now:
            self.on_cooldown(route.model, until)
        self._log_decision(route, decision or Decision(route.lane, route.model, PREFERRED,
                                                       f"{window} limit answer; no lane left"),
                           state, now)
        if decision is not None:
            self.metrics.rerouted.labels(route.model, self.policy.mode).inc()
        return decision

    def retry_after(self, route: Route) -> int:
        """Whole seconds until some lane of ``route`` has room for a typical request (the
        preferred lane also not before its cooldown ends)."""
        now = self.clock.seconds()

        def wait_for(model: str) -> float:
            need = max(self.engine.state(model, now).predicted_need, 1)
            return self.engine.seconds_until_room(model, need, now)

        until = self.policy.cooldown_until(route.model, now)
        waits = [max(wait_for(route.model), until - now if until else 0.0)]
        if route.secondary_lane:
            waits.append(wait_for(route.secondary_model or route.model))
        return max(1, math.ceil(min(waits)))

    def _log_decision(self, route: Route, decision: Decision, state: QuotaState,
                      now: float) -> None:
        until = decision.cooldown_next_ts
        log.info("reroute_policy {model}: {reroute_decision} -> {lane}/{served_model} "
                 "[quota {quota_state}, headroom {headroom_pct}%]{reason_text}",
                 decision="reroute_policy", mode=self.policy.mode, quota_state=state.state,
                 model=route.model, reroute_decision=decision.decision, lane=decision.lane,
                 served_model=decision.model, attempt=decision.attempt,
                 reason=decision.reason,
                 reason_text=f" ({decision.reason})" if decision.reason else "",
                 headroom_pct=state.headroom_pct,
                 cooldown_remaining_sec=max(0.0, round(until - now, 1)) if until else 0.0)

    def usage_fields(self, model: str, decision: Decision | None) -> dict:
        """The policy and quota fields of a usage line, after the request was accounted."""
        fields = {}
        if model in self.engine.quotas:
            state = self.state(model, self.clock.seconds())
            fields = {"quota_headroom_pct": state.headroom_pct,
                      "headroom_pct_rolling": state.rolling.headroom_pct,
                      "headroom_pct_weekly": state.weekly.headroom_pct,
                      "quota_warn_threshold": state.warn_pct, "warn_pct_auto": state.warn_pct,
                      **self.calibration.gap_stats(model, "rolling")}
        if decision is not None:
            fields.update(reroute_decision=decision.decision, decision_reason=decision.reason,
                          reroute_attempt=decision.attempt,
                          preferred_attempt=decision.preferred_attempt,
                          cooldown_active=decision.cooldown_active,
                          cooldown_next_ts=decision.cooldown_next_ts)
        return fields

    # -- accounting ------------------------------------------------------------------------------

    def account(self, model: str, usage, *, seconds: float, stream_seconds: float,
                ttft_seconds: float | None) -> None:
        """Count a finished request's tokens against ``model`` (the model the lane served)."""
        now = self.clock.seconds()
        self.engine.record(model, now, input_tokens=usage.input_tokens,
                           output_tokens=usage.output_tokens,
                           cache_creation_input_tokens=usage.cache_creation_input_tokens,
                           cache_read_input_tokens=usage.cache_read_input_tokens,
                           seconds=seconds, stream_seconds=stream_seconds,
                           ttft_seconds=ttft_seconds)
        if model in self.engine.quotas:
            self._update_gauges(now, [model])

    def _update_gauges(self, now: float, models=None) -> None:
        for model in models if models is not None else list(self.engine.quotas):
            state = self.engine.state(model, now)
            for window in state.windows:
                if window.limit_tokens:
                    self.metrics.quota_headroom.labels(model, window.name).set(
                        window.headroom_tokens / window.limit_tokens)

    # -- calibration -----------------------------------------------------------------------------

    def ingest_probe_results(self) -> int:
        """Read the GLM probe results file when it is new or changed; rows used."""
        path = self.config.calibration.probe_results
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return 0
        if mtime == self._probe_mtime:
            return 0
        self._probe_mtime = mtime
        used = self.calibration.set_probe_rows(read_probe_results(path))
        log.info("calibration: {rows} samples from {path}", rows=used, path=path)
        return used

    def sample(self) -> None:
        """The sampler's tick: gap samples for limits still pending, fresh gauges, probe file.
        Makes no external call."""
        now = self.clock.seconds()
        self.ingest_probe_results()
        for model in sorted(self.engine.quotas):
            state = self.engine.state(model, now)
            for window in state.windows:
                self.calibration.sample(model, window.name, now, window.reset_eta_sec)
            warn = self._auto_warn(model)
            if warn.confidence < 0.5 and warn.min_samples_reached:
                log.info("calibration of {model}: warn_pct_auto {pct} at low confidence "
                         "{confidence}", model=model, pct=warn.warn_pct_auto,
                         confidence=warn.confidence)
        self._update_gauges(now)

    # -- views -----------------------------------------------------------------------------------

    def usage_view(self) -> dict:
        now = self.clock.seconds()
        models = sorted(set(self.engine.models) | set(self.engine.quotas) | set(self.policy.last))
        return {"ts": now, "reroute_mode": self.policy.mode,
                "cooldown_sec": self.policy.cooldown_sec,
                "models": {model: self.model_view(model, now) for model in models}}

    def model_view(self, model: str, now: float) -> dict:
        state = self.state(model, now)
        quota = self.engine.quotas.get(model)
        warn_pct = quota.warn_pct if quota else None  # no quota: nothing to warn about
        auto = self._auto_warn(model)
        usage = self.engine.models.get(model)
        route = self.config.route_for(model)
        until = self.policy.cooldown_until(model, now)
        last = self.policy.last.get(model)
        overshoot = self.policy.overshoot_at.get(model)
        windows = {}
        for window in state.windows:
            windows[window.name] = {
                "window_hours": window.window_hours, "used_tokens": window.used_tokens,
                "limit_tokens": window.limit_tokens, "headroom_pct": window.headroom_pct,
                "headroom_tokens": window.headroom_tokens,
                "used_hours": window.used_hours, "limit_hours": window.limit_hours,
                "reset_eta_sec": window.reset_eta_sec, "state": state.window_state(window)}
        rolling_gaps = self.calibration.gap_stats(model, "rolling")
        return {
            "quota": quota.to_dict() if quota else None,
            **windows,
            "state": state.state, "warn": state.state == "warn", "block": state.blocked,
            "warn_pct": warn_pct,
            "warn_pct_auto": auto.warn_pct_auto if auto else warn_pct,
            "warn_pct_confidence": auto.confidence if auto else 0.0,
            "min_samples_reached": auto.min_samples_reached if auto else False,
            **rolling_gaps,
            "calibration": {
                "rolling": rolling_gaps,
                "weekly": self.calibration.gap_stats(model, "weekly"),
                "limit_multiplier": auto.limit_multiplier if auto else 1.0,
                "multiplier_samples": self.calibration.multiplier_samples(model)},
            "requests": usage.requests if usage else 0,
            "input_tokens": usage.input_tokens if usage else 0,
            "output_tokens": usage.output_tokens if usage else 0,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens if usage else 0,
            "cache_read_input_tokens": usage.cache_read_input_tokens if usage else 0,
            "speeds": self.engine.speeds(model),
            "policy": {
                "mode": self.policy.mode, "lane": route.lane,
                "secondary": (f"{route.secondary_lane}/{route.secondary_model or route.model}"
                              if route.secondary_lane else None),
                "cooldown_active": until is not None, "cooldown_next_ts": until,
                "cooldown_remaining_sec": round(until - now, 1) if until else 0,
                "overshoot_at": overshoot,
                "last_decision": last.decision if last else None,
                "last_reason": last.reason if last else None,
                "predicted_need_tokens": state.predicted_need},
        }

    def quotas_view(self) -> dict:
        return {"file": self.quota_file, "loaded_at": self.quotas_loaded_at,
                "models": {model: quota.to_dict()
                           for model, quota in sorted(self.engine.quotas.items())}}


class CalibrationSampler(TimerService):
    """Runs :meth:`Governor.sample` every ``sample_minutes``; a failing tick is logged and the
    next one still runs (a LoopingCall would stop for good after one exception)."""

    name = "calibration-sampler"

    def __init__(self, governor: Governor, interval_s: float, clock=None):
        super().__init__(interval_s, self._tick)
        self.governor = governor
        if clock is not None:
            self.clock = clock

    def _tick(self) -> None:
        try:
            self.governor.sample()
        except Exception:  # noqa: BLE001 - keep sampling whatever one tick did
            log.failure("calibration sample failed")

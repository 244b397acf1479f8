"""The JSON documents of ``/v1/usage`` and ``/v1/quotas``: pure functions of the governor's
state at ``now`` (field names are a contract: docs/QUOTAS.md and ``fixtures/usage``)."""
from __future__ import annotations

from ccpd.evidence import LANE_WIDE, OVERAGE_STATUS, UNIFIED, Reading


def usage_view(governor, now: float) -> dict:
    models = sorted(set(governor.engine.models) | set(governor.engine.quotas)
                    | set(governor.policy.last) | set(governor.config.routes))
    lanes = sorted(set(governor.config.lanes))
    return {"ts": now, "reroute_mode": governor.policy.mode,
            "cooldown_sec": governor.policy.cooldown_sec,
            "models": {model: model_view(governor, model, now) for model in models},
            "lanes": {lane: lane_view(governor, lane, now) for lane in lanes},
            **({"team": governor.team.view()} if governor.team is not None else {})}


def _reading(reading: Reading, now: float, evidence) -> dict:
    return {"utilization": reading.utilization, "reset_at": reading.reset_at,
            "surpassed_threshold": reading.surpassed_threshold,
            "reset_in_sec": (round(max(0.0, reading.reset_at - now), 1)
                             if reading.reset_at is not None else None),
            "status": reading.status, "source": reading.source,
            "age_sec": round(reading.age(now), 1),
            "fresh": evidence.is_fresh(reading, now)}


def lane_view(governor, lane: str, now: float) -> dict:
    """What the provider says about ``lane`` (its plan), what ccpd counted against the
    lane's plan limit, and the limits the two imply."""
    evidence = governor.evidence
    readings = [r for r in evidence.lane_readings(lane, now) if r.window not in LANE_WIDE]
    unified = evidence.readings.get((lane, UNIFIED))
    overage = evidence.readings.get((lane, OVERAGE_STATUS))
    plan = governor.plans.quotas.get(lane)
    counted = governor.plans.state(lane, now)
    return {
        "usable": lane not in evidence.unusable,
        "unusable_reason": evidence.unusable.get(lane),
        "provider": {
            "status": unified.status if unified else None,
            "representative_claim": unified.claim if unified else None,
            "reset_at": unified.reset_at if unified else None,
            "overage_status": overage.status if overage else None,
            "age_sec": round(unified.age(now), 1) if unified else None,
            "windows": {r.window: _reading(r, now, evidence) for r in readings}},
        "learned_limits": {
            window: {"tokens": learned.tokens, "samples": learned.samples,
                     "confidence": learned.confidence}
            for window in sorted({r.window for r in readings} | {"five_hour", "seven_day"})
            if (learned := evidence.learned_limit(lane, window)) is not None},
        "plan": plan.to_dict() if plan else None,
        "counted": {w.name: {"used_tokens": w.used_tokens, "limit_tokens": w.limit_tokens,
                             "headroom_pct": w.headroom_pct,
                             "state": counted.window_state(w)} for w in counted.windows},
    }


def model_view(governor, model: str, now: float) -> dict:
    state = governor.state(model, now)
    quota = governor.engine.quotas.get(model)
    warn_pct = quota.warn_pct if quota else None  # no quota: nothing to warn about
    auto = governor.auto_warn(model)
    usage = governor.engine.models.get(model)
    route = governor.config.route_for(model)
    policy = governor.policy
    until = policy.cooldown_until(model, now)
    last = policy.last.get(model)
    standing = governor.standing(route.lane, model, now)
    windows = {}
    for window in state.windows:
        windows[window.name] = {
            "window_hours": window.window_hours, "used_tokens": window.used_tokens,
            "limit_tokens": window.limit_tokens, "headroom_pct": window.headroom_pct,
            "headroom_tokens": window.headroom_tokens,
            "used_hours": window.used_hours, "limit_hours": window.limit_hours,
            "reset_eta_sec": window.reset_eta_sec, "state": state.window_state(window)}
    rolling_gaps = governor.calibration.gap_stats(model, "rolling")
    provider = {window: _reading(reading, now, governor.evidence)
                for window, reading in governor.evidence.fresh(route.lane, now).items()}
    return {
        "quota": quota.to_dict() if quota else None,
        **windows,
        "state": standing.state, "warn": standing.state == "warn", "block": standing.blocked,
        "evidence": standing.source, "state_reason": standing.reason,
        "counted_state": state.state,
        "provider": provider,
        "warn_pct": warn_pct,
        "warn_pct_auto": auto.warn_pct_auto if auto else warn_pct,
        "warn_pct_confidence": auto.confidence if auto else 0.0,
        "min_samples_reached": auto.min_samples_reached if auto else False,
        **rolling_gaps,
        "calibration": {
            "rolling": rolling_gaps,
            "weekly": governor.calibration.gap_stats(model, "weekly"),
            "limit_multiplier": auto.limit_multiplier if auto else 1.0,
            "multiplier_samples": governor.calibration.multiplier_samples(model)},
        "requests": usage.requests if usage else 0,
        "input_tokens": usage.input_tokens if usage else 0,
        "output_tokens": usage.output_tokens if usage else 0,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens if usage else 0,
        "cache_read_input_tokens": usage.cache_read_input_tokens if usage else 0,
        "speeds": governor.engine.speeds(model),
        "policy": {
            "mode": policy.mode, "lane": route.lane,
            "secondary": (f"{route.secondary_lane}/{route.secondary_model or route.model}"
                          if route.secondary_lane else None),
            "cooldown_active": until is not None, "cooldown_next_ts": until,
            "cooldown_remaining_sec": round(until - now, 1) if until else 0,
            "overshoot_at": policy.overshoot_at.get(model),
            "last_decision": last.decision if last else None,
            "last_reason": last.reason if last else None,
            "predicted_need_tokens": state.predicted_need},
    }


def quotas_view(governor) -> dict:
    return {"file": governor.quota_file, "loaded_at": governor.quotas_loaded_at,
            "models": {model: quota.to_dict()
                       for model, quota in sorted(governor.engine.quotas.items())},
            "lanes": {lane: quota.to_dict()
                      for lane, quota in sorted(governor.plans.quotas.items())}}

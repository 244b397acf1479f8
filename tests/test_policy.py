"""The reroute policy's decisions in each mode, cooldowns and limit answers (which limit an
answer is, and when it lifts: tests/test_limits.py)."""
from __future__ import annotations

import pytest

from ccpd.config import Route
from ccpd.policy import (BLOCKED, PREFERRED, REROUTED_COOLDOWN, REROUTED_LIMIT, REROUTED_QUOTA,
                         Policy)
from ccpd.quotas import ModelQuota, QuotaEngine

T0 = 1_800_000_000.0
ROUTE = Route("glm", "zai", "anthropic", "claude-x")
ALONE = Route("glm", "zai")


def standing(used: int, limit: int = 1000, model: str = "glm"):
    quotas = QuotaEngine({model: ModelQuota(rolling_limit_tokens=limit, warn_pct=0.8)})
    for _ in range(4):
        quotas.record(model, T0 - 60, input_tokens=used // 4)
    return quotas.state(model, T0)


OK, WARN, FULL = standing(400), standing(900), standing(1000)


def decide(policy, state, route=ROUTE, now=T0, secondary=None):
    room = None if state.quota is None else state.headroom_tokens
    return policy.decide(route, state, secondary, now, room)


def test_run2cap_always_tries_the_preferred_lane():
    policy = Policy("run2cap", 300)
    assert decide(policy, FULL).decision == PREFERRED
    reroute = policy.after_limit(ROUTE, None, T0, "window_exhausted:five_hour", T0 + 300)
    assert (reroute.lane, reroute.model, reroute.decision, reroute.attempt) == \
        ("anthropic", "claude-x", REROUTED_LIMIT, 1)
    assert reroute.reason == "window_exhausted:five_hour"
    assert reroute.preferred_attempt and not reroute.cooldown_active
    assert decide(policy, OK).decision == PREFERRED  # no cooldown in run2cap


def test_preemptive_skips_a_blocked_lane_only():
    policy = Policy("preemptive", 300)
    assert decide(policy, WARN).decision == PREFERRED
    decision = decide(policy, FULL)
    assert (decision.decision, decision.lane, decision.model) == \
        (REROUTED_QUOTA, "anthropic", "claude-x")
    assert not decision.preferred_attempt
    assert decide(policy, FULL, route=ALONE).decision == BLOCKED


def test_blocked_when_the_secondary_is_blocked_too():
    policy = Policy("preemptive", 300)
    assert decide(policy, FULL, secondary=standing(1000, model="claude-x")).decision == BLOCKED


def test_hybrid_reroutes_when_headroom_is_below_the_predicted_need_after_one_overshoot():
    policy = Policy("hybrid", 300)
    # predicted need 225 tokens (mean request), headroom 100: short
    state = standing(900)
    first = decide(policy, state)
    assert first.decision == PREFERRED and first.reason.startswith("overshoot attempt")
    second = decide(policy, state, now=T0 + 10)
    assert second.decision == REROUTED_QUOTA and "predicted need" in second.reason
    # the overshoot allowance comes back once per cooldown window
    assert decide(policy, state, now=T0 + 300).decision == PREFERRED


def test_hybrid_limit_answer_starts_a_cooldown_that_expires():
    policy = Policy("hybrid", 300)
    reroute = policy.after_limit(ROUTE, None, T0, "window_exhausted:five_hour", T0 + 300)
    assert reroute.decision == REROUTED_LIMIT and reroute.cooldown_next_ts == T0 + 300
    during = decide(policy, OK, now=T0 + 299)
    assert (during.decision, during.lane, during.cooldown_next_ts) == \
        (REROUTED_COOLDOWN, "anthropic", T0 + 300)
    assert decide(policy, OK, now=T0 + 300).decision == PREFERRED


def test_no_cooldown_end_means_no_cooldown():
    policy = Policy("hybrid", 0)
    reroute = policy.after_limit(ROUTE, None, T0, "burst")  # a burst: no window cooldown
    assert reroute.decision == REROUTED_LIMIT and not reroute.cooldown_active
    assert decide(policy, OK, now=T0 + 1).decision == PREFERRED


def test_limit_answer_without_secondary_passes_the_answer_on():
    assert Policy("hybrid", 300).after_limit(ALONE, None, T0, "window_exhausted:weekly",
                                             T0 + 300) is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="preemptive, run2cap, hybrid"):
        Policy("yolo", 1)


def test_hybrid_without_cooldown_reroutes_as_soon_as_headroom_is_short():
    policy = Policy("hybrid", 0)
    decision = decide(policy, standing(900))
    assert decision.decision == REROUTED_QUOTA and "predicted need" in decision.reason

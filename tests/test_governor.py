"""The governor with a Clock: quota windows expire, thresholds flip, cooldowns end — all by
advancing time, as the daemon sees it."""
from __future__ import annotations

import json

from twisted.internet import task
from twisted.web.http_headers import Headers

from ccpd.config import config_from_string
from ccpd.governor import Governor
from ccpd.limits import LimitAnswer
from ccpd.metrics import Metrics
from ccpd.quotas import ModelQuota
from ccpd.usage import TokenUsage
from ccpd.web.views import usage_view

INI = """
[lane:zai]
base_url = http://127.0.0.1:9
[lane:anthropic]
base_url = http://127.0.0.1:9
[routing]
default_lane = anthropic
reroute_mode = {mode}
cooldown_sec = 300
[routes]
glm-4.6 = zai, anthropic/claude-x
[quotas]
file = {quotas}
"""


class Keep:
    """What the governor hands the store to keep across restarts."""

    def __init__(self):
        self.cooldowns, self.readings = [], []

    def save_cooldown(self, model, until):
        self.cooldowns.append((model, until))

    def save_reading(self, reading):
        self.readings.append(reading)


def governor(tmp_path, mode="hybrid", keep=None, **quota):
    quotas = tmp_path / "quotas.json"
    quotas.write_text(json.dumps({"models": {}}))
    config = config_from_string(INI.format(mode=mode, quotas=quotas), "t.ini", environ={})
    clock = task.Clock()
    clock.advance(1_800_000_000)
    limits = {"rolling_limit_tokens": 1000, "warn_pct": 0.5, **quota}
    return (Governor(config, {"glm-4.6": ModelQuota(**limits)}, Metrics(), clock, keep=keep),
            clock, config)


def use(gov, tokens, model="glm-4.6", lane="zai"):
    gov.account(model, lane, TokenUsage(input_tokens=tokens), seconds=1.0, stream_seconds=0.5,
                ttft_seconds=0.1)


def model_of(gov, model="glm-4.6"):
    return usage_view(gov, gov.clock.seconds())["models"][model]


def window_exhausted(reset_at=None, window="five_hour"):
    return LimitAnswer("window_exhausted", window, reset_at,
                       "retry-after" if reset_at else None, "1308")


def test_thresholds_and_window_expiry_follow_the_clock(tmp_path):
    gov, clock, config = governor(tmp_path, mode="preemptive")
    route = config.route_for("glm-4.6")
    use(gov, 400)
    assert model_of(gov)["state"] == "ok"
    clock.advance(3600)
    use(gov, 200)
    assert model_of(gov)["state"] == "warn"
    use(gov, 400)
    assert gov.decide(route).decision == "rerouted_quota"
    clock.advance(4 * 3600 + 60)  # the first 400 tokens leave the 5-hour window
    view = model_of(gov)
    assert view["rolling"]["used_tokens"] == 600 and view["state"] == "warn"
    assert gov.decide(route).decision == "preferred"
    clock.advance(3600)
    assert model_of(gov)["rolling"]["used_tokens"] == 0
    assert model_of(gov)["weekly"]["used_tokens"] == 1000  # for a week


def test_cooldown_after_a_limit_answer_ends_with_time(tmp_path):
    gov, clock, config = governor(tmp_path, keep=Keep())
    route = config.route_for("glm-4.6")
    reroute = gov.after_limit(route, "zai", window_exhausted(), 0.25)  # no reset said
    assert reroute.decision == "rerouted_limit" and reroute.model == "claude-x"
    assert "window_exhausted:five_hour" in reroute.reason
    clock.advance(299)  # cooldown_sec is the fallback
    assert gov.decide(route).decision == "rerouted_cooldown"
    clock.advance(1)
    assert gov.decide(route).decision == "preferred"
    view = model_of(gov)
    assert view["policy"]["cooldown_active"] is False
    assert view["gap_samples"] == 0  # nothing used yet: no ETA to compare with


def test_blocked_retry_after_counts_down_with_the_clock(tmp_path):
    gov, clock, config = governor(tmp_path, mode="preemptive")
    route = config.route_for("glm-4.6")
    solo = type(route)(model="glm-4.6", lane="zai")
    use(gov, 1000)
    assert gov.decide(solo).decision == "blocked"
    first = gov.retry_after(solo)
    clock.advance(3600)
    assert gov.retry_after(solo) == first - 3600


def test_retry_after_waits_for_the_cooldown_when_the_secondary_is_full_too(tmp_path):
    gov, clock, config = governor(tmp_path)
    gov.engine.set_quotas({**gov.engine.quotas,
                           "claude-x": ModelQuota(rolling_limit_tokens=100)})
    use(gov, 100, model="claude-x", lane="anthropic")
    clock.advance(5 * 3600 - 10)  # the secondary's usage frees in about 70 s
    route = config.route_for("glm-4.6")
    assert gov.after_limit(route, "zai", window_exhausted(), 0.1) is None  # nowhere to go
    assert gov.decide(route).decision == "blocked"
    assert 60 <= gov.retry_after(route) <= 80  # the secondary frees before the cooldown ends
    clock.advance(200)
    use(gov, 100, model="claude-x", lane="anthropic")
    assert gov.retry_after(route) == 100  # now the cooldown (300 s from the answer) is sooner


# -- provider evidence: each class of limit answer, and utilisation on every answer ------------

def unified(**windows) -> Headers:
    """Answer headers with Anthropic's unified rate-limit figures (``five_hour=0.85``)."""
    now = 1_800_000_000
    raw = {b"anthropic-ratelimit-unified-status": [b"allowed"],
           b"anthropic-ratelimit-unified-representative-claim": [b"five_hour"]}
    for window, value in windows.items():
        short = {"five_hour": b"5h", "seven_day": b"7d"}[window]
        raw[b"anthropic-ratelimit-unified-" + short + b"-utilization"] = [str(value).encode()]
        raw[b"anthropic-ratelimit-unified-" + short + b"-reset"] = [str(now + 7200).encode()]
    return Headers(raw)


def counted(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_burst_limit_starts_no_cooldown_and_gives_no_calibration_sample(tmp_path):
    keep = Keep()
    gov, clock, config = governor(tmp_path, keep=keep)
    route = config.route_for("glm-4.6")
    burst = LimitAnswer("burst", None, clock.seconds() + 30, "retry-after", "1302")
    reroute = gov.after_limit(route, "zai", burst, 0.1)
    assert reroute.decision == "rerouted_limit" and "burst" in reroute.reason
    assert keep.cooldowns == [] and gov.policy.cooldowns == {}
    assert gov.calibration.pending == {} and gov.calibration.multiplier_samples("glm-4.6") == 0
    assert gov.decide(route).decision == "preferred"  # the next request tries zai again
    solo = type(route)(model="glm-4.6", lane="zai")
    assert gov.after_limit(solo, "zai", burst, 0.1) is None  # the client gets the 429
    assert counted(gov.metrics, "ccp_limit_answers_total", lane="zai", **{"class": "burst"}) == 2


def test_a_window_exhausted_answer_cools_down_until_the_reported_reset(tmp_path):
    keep = Keep()
    gov, clock, config = governor(tmp_path, mode="preemptive", keep=keep)
    route = config.route_for("glm-4.6")
    reset = clock.seconds() + 3000
    use(gov, 100)
    reroute = gov.after_limit(route, "zai", window_exhausted(reset), 0.2)
    assert reroute.decision == "rerouted_limit"
    assert gov.calibration.pending  # one calibration sample, pending until the reset
    [saved] = keep.readings
    assert (saved.lane, saved.window, saved.status, saved.reset_at) == \
        ("zai", "five_hour", "rejected", reset)
    # preemptive: the provider's word blocks the lane until the reset, then it is tried again
    clock.advance(2999)
    decision = gov.decide(route)
    assert decision.decision == "rerouted_quota" and "rejected" in decision.reason
    clock.advance(1)
    assert gov.decide(route).decision == "preferred"


def test_hybrid_saves_the_cooldown_until_the_reset(tmp_path):
    keep = Keep()
    gov, clock, config = governor(tmp_path, keep=keep)
    reset = clock.seconds() + 1234
    gov.after_limit(config.route_for("glm-4.6"), "zai", window_exhausted(reset), 0.2)
    assert keep.cooldowns == [("glm-4.6", reset)]
    assert model_of(gov)["policy"]["cooldown_next_ts"] == reset


def test_overloaded_passes_through_and_is_counted(tmp_path):
    gov, clock, config = governor(tmp_path)
    route = config.route_for("glm-4.6")
    assert gov.after_limit(route, "zai", LimitAnswer("overloaded", code="1305"), 0.1) is None
    assert gov.policy.cooldowns == {} and gov.decide(route).decision == "preferred"
    assert counted(gov.metrics, "ccp_limit_answers_total", lane="zai",
                   **{"class": "overloaded"}) == 1


def test_an_account_problem_makes_the_lane_unusable_until_it_answers_again(tmp_path):
    gov, clock, config = governor(tmp_path)
    route = config.route_for("glm-4.6")
    problem = LimitAnswer("account", code="1113", message="Insufficient balance")
    assert gov.after_limit(route, "zai", problem, 0.1).lane == "anthropic"
    assert counted(gov.metrics, "ccp_lane_unusable", lane="zai") == 1
    decision = gov.decide(route)
    assert (decision.decision, decision.lane) == ("rerouted_limit", "anthropic")
    assert decision.reason.startswith("account: lane zai cannot serve")
    lane = usage_view(gov, clock.seconds())["lanes"]["zai"]
    assert lane["usable"] is False and "1113" in lane["unusable_reason"]
    gov.watch.observe_answer("zai", 200, Headers())  # e.g. another route's request succeeded
    assert gov.decide(route).decision == "preferred"
    assert counted(gov.metrics, "ccp_lane_unusable", lane="zai") == 0


def test_a_reload_gives_an_unusable_lane_another_chance(tmp_path):
    gov, clock, config = governor(tmp_path)
    gov.after_limit(config.route_for("glm-4.6"), "zai", LimitAnswer("account", code="1313"), 0)
    gov.reload()
    assert gov.evidence.unusable == {}


def test_provider_utilisation_decides_without_any_quota(tmp_path):
    gov, clock, config = governor(tmp_path, mode="preemptive")
    gov.engine.set_quotas({})  # no quotas.json entry at all
    route = config.route_for("glm-4.6")
    gov.watch.observe_answer("zai", 200, unified(five_hour=0.85, seven_day=0.3))
    view = model_of(gov)
    assert (view["state"], view["evidence"]) == ("warn", "provider")
    assert view["provider"]["five_hour"]["utilization"] == 0.85
    assert counted(gov.metrics, "ccp_provider_utilization_ratio", lane="zai",
                   window="five_hour") == 0.85
    assert counted(gov.metrics, "ccp_provider_reset_timestamp_seconds", lane="zai",
                   window="five_hour") == 1_800_000_000 + 7200
    assert gov.decide(route).decision == "preferred"
    gov.watch.observe_answer("zai", 200, unified(five_hour=0.985))  # past block_at (0.98)
    assert gov.decide(route).decision == "rerouted_quota"
    clock.advance(601)  # older than provider_max_age: no longer evidence
    assert gov.decide(route).decision == "preferred"
    assert model_of(gov)["state"] == "ok"


def test_plan_limits_per_lane_and_the_provider_figure_supersedes_the_count(tmp_path):
    gov, clock, config = governor(tmp_path, mode="preemptive")
    gov.engine.set_quotas({})
    gov.plans.set_quotas({"zai": ModelQuota(rolling_limit_tokens=500)})
    route = config.route_for("glm-4.6")
    use(gov, 300, model="glm-4.5")  # another model on the same plan
    use(gov, 250)
    assert gov.standing("zai", "glm-4.6", clock.seconds()).source == "plan"
    assert gov.decide(route).decision == "rerouted_quota"
    assert counted(gov.metrics, "ccp_plan_headroom_ratio", lane="zai", window="rolling") == 0
    # the provider counts the plan's traffic ccpd never sees: its fresh figure wins
    gov.watch.observe_answer("zai", 200, unified(five_hour=0.2))
    assert gov.decide(route).decision == "preferred"


def test_the_limit_the_readings_imply_is_learned(tmp_path):
    gov, clock, config = governor(tmp_path)
    use(gov, 20_000)
    gov.watch.observe_answer("zai", 200, unified(five_hour=0.1))
    learned = usage_view(gov, clock.seconds())["lanes"]["zai"]["learned_limits"]["five_hour"]
    assert learned["tokens"] == 200_000 and learned["samples"] == 1


def test_readings_are_saved_at_most_once_a_minute_and_restored(tmp_path):
    keep = Keep()
    gov, clock, config = governor(tmp_path, keep=keep)
    for _ in range(5):
        gov.watch.observe_answer("zai", 200, unified(five_hour=0.5))
        clock.advance(10)
    assert [r.window for r in keep.readings] == ["unified", "five_hour"]  # once each
    again, _clock, _config = governor(tmp_path)
    again.restore({}, [], [reading.to_row() for reading in keep.readings])
    assert model_of(again)["provider"]["five_hour"]["utilization"] == 0.5

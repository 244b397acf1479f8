"""The governor with a Clock: quota windows expire, thresholds flip, cooldowns end — all by
advancing time, as the daemon sees it."""
from __future__ import annotations

import json

from twisted.internet import task

from ccpd.config import config_from_string
from ccpd.governor import Governor
from ccpd.metrics import Metrics
from ccpd.quotas import ModelQuota
from ccpd.usage import TokenUsage

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


def governor(tmp_path, mode="hybrid", **quota):
    quotas = tmp_path / "quotas.json"
    quotas.write_text(json.dumps({"models": {}}))
    config = config_from_string(INI.format(mode=mode, quotas=quotas), "t.ini", environ={})
    clock = task.Clock()
    clock.advance(1_800_000_000)
    limits = {"rolling_limit_tokens": 1000, "warn_pct": 0.5, **quota}
    return Governor(config, {"glm-4.6": ModelQuota(**limits)}, Metrics(), clock), clock, config


def use(gov, tokens):
    gov.account("glm-4.6", TokenUsage(input_tokens=tokens), seconds=1.0, stream_seconds=0.5,
                ttft_seconds=0.1)


def test_thresholds_and_window_expiry_follow_the_clock(tmp_path):
    gov, clock, config = governor(tmp_path, mode="preemptive")
    route = config.route_for("glm-4.6")
    use(gov, 400)
    assert gov.usage_view()["models"]["glm-4.6"]["state"] == "ok"
    clock.advance(3600)
    use(gov, 200)
    assert gov.usage_view()["models"]["glm-4.6"]["state"] == "warn"
    use(gov, 400)
    assert gov.decide(route).decision == "rerouted_quota"
    clock.advance(4 * 3600 + 60)  # the first 400 tokens leave the 5-hour window
    view = gov.usage_view()["models"]["glm-4.6"]
    assert view["rolling"]["used_tokens"] == 600 and view["state"] == "warn"
    assert gov.decide(route).decision == "preferred"
    clock.advance(3600)
    assert gov.usage_view()["models"]["glm-4.6"]["rolling"]["used_tokens"] == 0
    assert gov.usage_view()["models"]["glm-4.6"]["weekly"]["used_tokens"] == 1000  # for a week


def test_cooldown_after_a_limit_answer_ends_with_time(tmp_path):
    gov, clock, config = governor(tmp_path)
    route, lane = config.route_for("glm-4.6"), type("Lane", (), {"config": config.lanes["zai"]})
    saved = []
    gov.on_cooldown = lambda model, until: saved.append((model, until))
    reroute = gov.after_limit(route, lane, 429, "1308", {"retry-after": "600"}, None, 0.25)
    assert reroute.decision == "rerouted_limit" and reroute.model == "claude-x"
    assert saved == [("glm-4.6", clock.seconds() + 300)]
    clock.advance(299)
    assert gov.decide(route).decision == "rerouted_cooldown"
    clock.advance(1)
    assert gov.decide(route).decision == "preferred"
    view = gov.usage_view()["models"]["glm-4.6"]
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
    gov.account("claude-x", TokenUsage(input_tokens=100), seconds=1.0, stream_seconds=0.5,
                ttft_seconds=None)
    clock.advance(5 * 3600 - 10)  # the secondary's usage frees in about 70 s
    route, lane = config.route_for("glm-4.6"), type("Lane", (), {"config": config.lanes["zai"]})
    assert gov.after_limit(route, lane, 429, "1308", {}, None, 0.1) is None  # nowhere to go
    assert gov.decide(route).decision == "blocked"
    assert 60 <= gov.retry_after(route) <= 80  # the secondary frees before the cooldown ends
    clock.advance(200)
    gov.account("claude-x", TokenUsage(input_tokens=100), seconds=1.0, stream_seconds=0.5,
                ttft_seconds=None)
    assert gov.retry_after(route) == 100  # now the cooldown (300 s from the answer) is sooner

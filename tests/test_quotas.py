"""The quota engine: windows expire, thresholds warn and block, bad quota files are named."""
from __future__ import annotations

import json

import pytest

from ccpd.quotas import ModelQuota, QuotaEngine, QuotaError, Window, parse_quotas

H = 3600.0
T0 = 1_800_000_000.0  # an hour boundary


def engine(**quota) -> QuotaEngine:
    return QuotaEngine({"glm": ModelQuota(**{"rolling_window_hours": 5,
                                              "rolling_limit_tokens": 1000,
                                              "weekly_limit_tokens": 5000, **quota})})


def test_rolling_window_forgets_usage_after_its_length():
    quotas = engine()
    quotas.record("glm", T0, input_tokens=300, output_tokens=100)
    quotas.record("glm", T0 + 2 * H, input_tokens=200)
    assert quotas.state("glm", T0 + 2 * H).rolling.used_tokens == 600
    assert quotas.state("glm", T0 + 5 * H + 61).rolling.used_tokens == 200
    assert quotas.state("glm", T0 + 7 * H + 61).rolling.used_tokens == 0
    # the weekly window still holds both, and forgets them a week later
    assert quotas.state("glm", T0 + 7 * H + 61).weekly.used_tokens == 600
    assert quotas.state("glm", T0 + 7 * 24 * H + 3 * H).weekly.used_tokens == 0


def test_warn_and_block_thresholds():
    quotas = engine(warn_pct=0.8)
    quotas.record("glm", T0, input_tokens=799)
    assert quotas.state("glm", T0).state == "ok"
    quotas.record("glm", T0, input_tokens=1)
    state = quotas.state("glm", T0)
    assert state.state == "warn" and state.rolling.headroom_pct == 20.0
    quotas.record("glm", T0, output_tokens=200)
    state = quotas.state("glm", T0)
    assert state.blocked and state.headroom_tokens == 0 and state.headroom_pct == 0.0
    assert state.window_state(state.weekly) == "ok"


def test_weekly_limit_blocks_even_with_rolling_room():
    quotas = engine()
    for day in range(6):
        quotas.record("glm", T0 + day * 24 * H, input_tokens=900)
    state = quotas.state("glm", T0 + 5 * 24 * H)
    assert state.rolling.used_tokens == 900 and state.weekly.used_tokens == 5400
    assert state.blocked and state.window_state(state.rolling) == "warn"


def test_cache_reads_count_only_when_the_model_says_so():
    quotas = engine()
    quotas.record("glm", T0, input_tokens=10, cache_creation_input_tokens=5,
                  cache_read_input_tokens=1000, output_tokens=1)
    assert quotas.state("glm", T0).rolling.used_tokens == 16
    counted = engine(count_cache_read=True)
    counted.record("glm", T0, input_tokens=10, cache_read_input_tokens=1000)
    assert counted.state("glm", T0).rolling.used_tokens == 1010


def test_hours_are_telemetry_only():
    quotas = engine(rolling_limit_hours=0.001)
    quotas.record("glm", T0, input_tokens=1, seconds=3600)
    state = quotas.state("glm", T0)
    assert state.rolling.used_hours == 1.0 and state.rolling.limit_hours == 0.001
    assert state.state == "ok"


def test_models_without_quota_are_tracked_but_never_limited():
    quotas = engine()
    quotas.record("other", T0, input_tokens=10 ** 9)
    state = quotas.state("other", T0)
    assert state.rolling.used_tokens == 10 ** 9 and state.state == "ok"
    assert state.headroom_pct is None and state.quota is None


def test_recording_cost_does_not_grow_with_history():
    window = Window(5 * H, 60)
    for second in range(0, 24 * 3600, 5):  # a day of requests every 5 s
        window.add(T0 + second, 1, 0.0)
    # only the buckets of the last 5 hours are kept, however long the history
    assert len(window._buckets) <= 5 * 60 + 1
    assert window.tokens == sum(bucket[1] for bucket in window._buckets)


def test_seconds_until_room_walks_the_oldest_buckets():
    quotas = engine()
    quotas.record("glm", T0, input_tokens=600)
    quotas.record("glm", T0 + H, input_tokens=400)
    # needs 100: the 600 tokens of T0 must leave, at T0 + 5 h + one bucket
    assert quotas.seconds_until_room("glm", 100, T0 + 2 * H) == pytest.approx(3 * H + 60)
    assert quotas.seconds_until_room("glm", 100, T0 + 5 * H + 60) == 0.0


def test_predicted_need_is_the_mean_recent_request():
    quotas = engine()
    for tokens in (100, 200, 300):
        quotas.record("glm", T0, input_tokens=tokens)
    assert quotas.state("glm", T0).predicted_need == 200


def test_speeds_by_stream_and_total_time():
    quotas = engine()
    quotas.record("glm", T0, output_tokens=100, seconds=4.0, stream_seconds=2.0,
                  ttft_seconds=0.5)
    quotas.record("glm", T0, output_tokens=100, seconds=6.0, stream_seconds=3.0,
                  ttft_seconds=1.5)
    assert quotas.speeds("glm") == {"samples": 2, "out_tps_stream": 40.0,
                                    "out_tps_total": 20.0, "ttft_ms_p50": 1000.0}


def test_reload_keeps_usage_and_applies_new_limits():
    quotas = engine()
    quotas.record("glm", T0, input_tokens=900)
    quotas.set_quotas({"glm": ModelQuota(rolling_limit_tokens=800)})
    assert quotas.state("glm", T0).blocked


def test_parse_quotas_accepts_the_spec_example():
    text = json.dumps({"models": {"glm-4.6": {
        "rolling_window_hours": 5, "rolling_limit_tokens": 2000000,
        "weekly_limit_tokens": 20000000, "warn_pct": 0.8}}})
    assert parse_quotas(text, "q.json") == {"glm-4.6": ModelQuota(
        rolling_window_hours=5.0, rolling_limit_tokens=2000000, weekly_limit_tokens=20000000,
        warn_pct=0.8)}


def test_plan_limits_per_lane_sit_beside_the_models():
    text = json.dumps({"models": {"glm-4.6": {"rolling_limit_tokens": 100}},
                       "lanes": {"zai": {"rolling_limit_tokens": 2000000, "warn_pct": 0.9}}})
    quotas = parse_quotas(text, "q.json")
    assert quotas == {"glm-4.6": ModelQuota(rolling_limit_tokens=100)}
    assert quotas.lanes == {"zai": ModelQuota(rolling_limit_tokens=2000000, warn_pct=0.9)}
    assert parse_quotas('{"models": {}}', "q.json").lanes == {}  # old files: unchanged


@pytest.mark.parametrize("document, words", [
    ("{nope", "q.json: not valid JSON"),
    ('{"glm": {}}', 'q.json: must be an object with a "models" object'),
    ('{"models": {"glm": {"warn_pct": 1.5}}}', "q.json: models.glm.warn_pct: must be above 0 "
                                                "and at most 1"),
    ('{"models": {"glm": {"rolling_limit_tokens": -5}}}', "models.glm.rolling_limit_tokens"),
    ('{"models": {"glm": {"rolling_limit_tokens": 1.5}}}', "whole number"),
    ('{"models": {"glm": {"weekly_limit_tokens": "many"}}}', "must be a number"),
    ('{"models": {"glm": {"rolling_limit": 5}}}', "models.glm.rolling_limit: unknown key"),
    ('{"models": {"glm": {"count_cache_read": 1}}}', "must be true or false"),
    ('{"models": {"glm": 5}}', "models.glm: must be an object"),
    ('{"models": {}, "lanes": []}', "q.json: lanes: must be an object of lane names"),
    ('{"models": {}, "lanes": {"zai": {"warn_pct": 0}}}', "q.json: lanes.zai.warn_pct: must be "
                                                          "above 0"),
    ('{"models": {}, "plans": {}}', "q.json: unknown key 'plans'"),
])
def test_bad_quota_files_name_the_key(document, words):
    with pytest.raises(QuotaError) as raised:
        parse_quotas(document, "q.json")
    assert words in str(raised.value)

"""Calibration: gap statistics, auto warn %, the probe results file and the sampler service."""
from __future__ import annotations

import json

from twisted.internet import task

from ccpd.calibration import Calibration, parse_probe_results
from ccpd.config import config_from_string
from ccpd.governor import Governor
from ccpd.timers import CalibrationSampler, ProbeResultsWatcher
from ccpd.web.views import model_view
from ccpd.metrics import Metrics
from ccpd.quotas import ModelQuota

WINDOW = 5 * 3600.0

PROBE_FILE = """# GLM limit probe

Some notes that are not a table.

| timestamp | vendor | model | repeat | tokens | first_429_index | calc_headroom | inferred_multiplier | upstream_status | gap_seconds | hour_of_day |
|---|---|---|---|---|---|---|---|---|---|---|
| 2026-11-20T10:00:00Z | glm | glm-4.6 | 120 | 50 | 97 | 0.12 | 0.88 | 429 | -600 | 10 |
| 2026-11-21T10:00:00Z | glm | glm-4.6 | 120 | 50 | - | - | - | 200 | - | 10 |
| 2026-11-22T03:00:00Z | glm |  | 120 | 50 | 90 | 0.1 | 0.9 | 429 | -300 | 3 |
"""


def test_too_few_samples_fall_back_to_the_configured_warn_pct():
    calibration = Calibration(min_samples=5)
    for gap in (-600, -500, -400, -300):
        calibration.add_gap("glm", "rolling", gap)
    auto = calibration.auto_warn("glm", 0.8, WINDOW)
    assert (auto.warn_pct_auto, auto.min_samples_reached) == (0.8, False)
    assert 0 < auto.confidence < 0.5


def test_enough_samples_lower_the_warn_pct_by_gap_and_multiplier():
    calibration = Calibration(min_samples=5)
    for gap in (-1800, -1800, -1800, 600, 900):
        calibration.add_gap("glm", "rolling", gap)
    auto = calibration.auto_warn("glm", 0.8, WINDOW)
    # median gap -1800 s of a 5 h window: 0.8 - 0.1
    assert auto.min_samples_reached and auto.warn_pct_auto == 0.7
    for _ in range(5):
        calibration.add_multiplier("glm", 0.9)
    auto = calibration.auto_warn("glm", 0.8, WINDOW)
    assert auto.warn_pct_auto == 0.62 and auto.limit_multiplier == 0.9  # 0.8 * 0.9 - 0.1
    assert auto.confidence == 0.5
    assert calibration.gap_stats("glm", "rolling") == {
        "gap_seconds_p50": -1800.0, "gap_seconds_p95": 840.0, "gap_samples": 5}


def test_positive_gaps_never_raise_the_threshold_past_the_ceiling():
    calibration = Calibration(min_samples=1)
    calibration.add_multiplier("glm", 3.0)
    assert calibration.auto_warn("glm", 0.8, WINDOW).warn_pct_auto == 0.99


def test_ring_buffers_keep_the_latest_samples():
    calibration = Calibration(ring_size=3)
    for gap in range(10):
        calibration.add_gap("glm", "weekly", gap)
    assert calibration.gap_stats("glm", "weekly")["gap_samples"] == 3
    assert calibration.gap_stats("glm", "weekly")["gap_seconds_p50"] == 8.0


def test_one_limit_answer_is_one_gap_sample_refreshed_until_its_reset_passes():
    calibration = Calibration()
    now = 1000.0
    calibration.observe_limit("glm", "rolling", now, calc_eta=3600, observed_reset=now + 4000,
                              used_fraction=0.85)
    assert calibration.gap_stats("glm", "rolling")["gap_seconds_p50"] == -400.0
    assert calibration.multiplier_samples("glm") == 1
    for tick in range(1, 6):  # the sampler refreshes the same sample, never adds one
        assert calibration.sample("glm", "rolling", now + tick * 600, calc_eta=3600)
    stats = calibration.gap_stats("glm", "rolling")
    assert stats["gap_samples"] == 1 and stats["gap_seconds_p50"] == 2600.0
    assert not calibration.sample("glm", "rolling", now + 4001, calc_eta=10)
    assert ("glm", "rolling") not in calibration.pending
    assert calibration.gap_stats("glm", "rolling") == {
        "gap_seconds_p50": 2600.0, "gap_seconds_p95": 2600.0, "gap_samples": 1}
    # a second limit answer is a second sample
    calibration.observe_limit("glm", "rolling", now + 5000, calc_eta=100,
                              observed_reset=now + 5100, used_fraction=None)
    assert calibration.gap_stats("glm", "rolling")["gap_samples"] == 2


def test_probe_file_rows_are_parsed_by_column_name():
    rows = parse_probe_results(PROBE_FILE)
    assert len(rows) == 3
    assert rows[0]["model"] == "glm-4.6" and rows[0]["inferred_multiplier"] == 0.88
    assert rows[0]["gap_seconds"] == -600.0 and rows[0]["first_429_index"] == 97.0
    assert rows[1]["inferred_multiplier"] is None and rows[2]["model"] is None
    calibration = Calibration()
    assert calibration.set_probe_rows(rows) == 2
    assert calibration.multiplier_samples("glm-4.6") == 2
    assert calibration.gap_stats("glm-4.6", "rolling")["gap_seconds_p50"] == -450.0
    # the file read again (it changed) replaces its samples instead of adding them twice
    assert calibration.set_probe_rows(rows + rows[:1]) == 3
    assert calibration.multiplier_samples("glm-4.6") == 3


INI = """
[lane:zai]
base_url = http://127.0.0.1:9
[routing]
default_lane = zai
[quotas]
file = {quotas}
[calibration]
sample_minutes = 10
probe_results = {probe}
"""


def governor_with_clock(tmp_path):
    quotas = tmp_path / "quotas.json"
    quotas.write_text(json.dumps({"models": {}}))
    probe = tmp_path / "GLM_LIMIT_PROBE.md"
    config = config_from_string(INI.format(quotas=quotas, probe=probe), "t.ini", environ={})
    clock = task.Clock()
    clock.advance(1_800_000_000)
    governor = Governor(config, {"glm-4.6": ModelQuota(rolling_limit_tokens=1000)}, Metrics(),
                        clock)
    return governor, clock, probe


def test_sampler_runs_every_sample_minutes_and_ingests_the_probe_file(tmp_path):
    governor, clock, probe = governor_with_clock(tmp_path)
    sampler = CalibrationSampler(governor, 600, clock=clock)
    watcher = ProbeResultsWatcher(str(probe), governor.calibration, 600, clock=clock)
    sampler.startService()
    watcher.startService()
    try:
        view = model_view(governor, "glm-4.6", clock.seconds())
        assert view["calibration"]["multiplier_samples"] == 0
        probe.write_text(PROBE_FILE)
        clock.advance(600)
        view = model_view(governor, "glm-4.6", clock.seconds())
        assert view["calibration"]["multiplier_samples"] == 2 and view["gap_samples"] == 2
        # a pending provider reset is compared with ccpd's ETA at every tick
        governor.engine.record("glm-4.6", clock.seconds(), input_tokens=900)
        governor.calibration.observe_limit("glm-4.6", "rolling", clock.seconds(), None,
                                           clock.seconds() + 20000, None)
        assert model_view(governor, "glm-4.6", clock.seconds())["gap_samples"] == 2
        clock.advance(600)
        view = model_view(governor, "glm-4.6", clock.seconds())
        assert view["gap_samples"] == 3 and view["calibration"]["multiplier_samples"] == 2
    finally:
        sampler.stopService()
        watcher.stopService()


def test_a_failing_tick_does_not_stop_the_sampler(tmp_path):
    governor, clock, _ = governor_with_clock(tmp_path)
    calls = []

    def flaky(now, models=None, lanes=None):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("boom")

    governor.update_gauges = flaky
    sampler = CalibrationSampler(governor, 600, clock=clock)
    sampler.startService()
    clock.advance(600)
    clock.advance(600)
    sampler.stopService()
    assert len(calls) == 3  # at start, then every 600 s despite the first failure


def test_repeated_answers_of_one_limit_event_are_one_sample():
    calibration = Calibration()
    now = 1000.0
    for i in range(30):  # run2cap meets the same cap on every request
        assert calibration.observe_limit("glm", "rolling", now + i, calc_eta=3600,
                                         observed_reset=now + 4000, used_fraction=0.9) == (i == 0)
    assert calibration.gap_stats("glm", "rolling")["gap_samples"] == 1
    assert calibration.multiplier_samples("glm") == 1
    assert not calibration.auto_warn("glm", 0.8, WINDOW).min_samples_reached
    # answers that name no reset: one event per minute at most
    for t in (0, 30, 59):
        calibration.observe_limit("glm", "weekly", now + t, None, None, 0.5)
    calibration.observe_limit("glm", "weekly", now + 200, None, None, 0.5)
    assert calibration.multiplier_samples("glm") == 3

"""The /metrics exposition never carries a value Prometheus would reject or misread."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ccpd.metrics import Metrics


def samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples}


def test_negative_gauges_are_clamped_and_nan_inf_skipped():
    metrics = Metrics()
    metrics.lane_up.labels("a").set(-3)
    metrics.lane_up.labels("b").set(float("nan"))
    metrics.lane_up.labels("c").set(float("inf"))
    metrics.lane_up.labels("d").set(1)
    values = samples(metrics)
    assert values[("ccp_lane_up", (("lane", "a"),))] == 0.0
    assert values[("ccp_lane_up", (("lane", "d"),))] == 1.0
    assert ("ccp_lane_up", (("lane", "b"),)) not in values
    assert ("ccp_lane_up", (("lane", "c"),)) not in values


def test_counters_and_histograms_are_exposed_with_spec_names():
    metrics = Metrics()
    metrics.requests.labels("zai", "glm-4.6", "200").inc()
    metrics.tokens.labels("zai", "glm-4.6", "output").inc(9)
    metrics.request_duration.labels("zai", "glm-4.6").observe(0.2)
    metrics.ttft.labels("zai", "glm-4.6").observe(0.05)
    values = samples(metrics)
    assert values[("ccp_requests_total", (("lane", "zai"), ("model", "glm-4.6"),
                                          ("status", "200")))] == 1.0
    assert values[("ccp_tokens_total", (("kind", "output"), ("lane", "zai"),
                                        ("model", "glm-4.6")))] == 9.0
    assert values[("ccp_request_duration_seconds_count", (("lane", "zai"),
                                                          ("model", "glm-4.6")))] == 1.0
    assert values[("ccp_ttft_seconds_sum", (("lane", "zai"), ("model", "glm-4.6")))] == 0.05

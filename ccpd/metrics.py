"""Prometheus metrics of ccpd, on a registry of their own, and their text exposition.

The exposition clamps negative values to 0 and skips NaN/Inf samples, so a bad computation
upstream of a gauge can never produce a scrape that Prometheus or promtool rejects.
"""
from __future__ import annotations

import math

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               ProcessCollector, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets in seconds, from sub-millisecond (local fakes, count_tokens) to long streams.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                     600)
REFUSAL_REASONS = ("host", "origin", "client_token", "headers_too_large", "header_timeout",
                   "overloaded", "body_too_large", "bad_target")
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class Metrics:
    """Every metric ccpd exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "ccp_requests", "Proxied requests by lane, requested model and HTTP status.",
            ["lane", "model", "status"], registry=r)
        self.tokens = Counter(
            "ccp_tokens", "Tokens accounted by lane, requested model and kind "
            "(input, output, cache_creation, cache_read).", ["lane", "model", "kind"], registry=r)
        self.request_duration = Histogram(
            "ccp_request_duration_seconds", "Time from request received to response finished.",
            ["lane", "model"], buckets=_DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(
            "ccp_ttft_seconds", "Time from request received to the first token (first content "
            "delta of a stream, first body byte otherwise).", ["lane", "model"],
            buckets=_TTFT_BUCKETS, registry=r)
        self.quota_headroom = Gauge(
            "ccp_quota_headroom_ratio", "Quota left in a model's window, 0-1 of its limit.",
            ["model", "window"], registry=r)
        self.preferred_attempt = Counter(
            "ccp_preferred_attempt", "Requests sent to the preferred lane while the model's "
            "quota was in warn or block state.", ["model", "lane"], registry=r)
        self.rerouted = Counter(
            "ccp_rerouted_on_limit", "Requests rerouted to the secondary lane because of a "
            "quota, a limit answer or a cooldown.", ["model", "mode"], registry=r)
        self.wasted_retry = Counter(
            "ccp_wasted_retry_seconds", "Time spent on preferred attempts that ended in a limit "
            "answer.", ["model"], registry=r)
        self.store_writes = Counter(
            "ccp_store_writes", "Samples written to the store.", registry=r)
        self.store_write_errors = Counter(
            "ccp_store_write_errors", "Failed store writes and rollup ticks (retried).",
            registry=r)
        self.rollup_duration = Histogram(
            "ccp_rollup_duration_seconds", "Time a rollup tick took.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.store_size = Gauge(
            "ccp_store_size_bytes", "Size of the store on disk (database and WAL).", registry=r)
        self.refused = Counter(
            "ccp_requests_refused", "Requests and connections ccpd refused before serving them, "
            "by reason: host, origin, client_token, headers_too_large, header_timeout, "
            "overloaded, body_too_large, bad_target.", ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        self.log_write_errors = Counter(
            "ccp_log_write_errors", "Lines that could not be written to a log at the first "
            "attempt (kept in memory and written later, in order).", ["log"], registry=r)
        self.log_spooled = Gauge(
            "ccp_log_spooled_lines", "Lines waiting in memory for the log's disk to accept "
            "them again.", ["log"], registry=r)
        self.log_dropped = Counter(
            "ccp_log_lines_dropped", "Lines given up because the log's spool was full (they "
            "are still in the store).", ["log"], registry=r)
        for log in ("usage", "anomaly"):
            for metric in (self.log_write_errors, self.log_spooled, self.log_dropped):
                metric.labels(log)
        self.quota_poll_errors = Counter(
            "ccp_quota_poll_errors", "Failed polls of a lane's quota endpoint (quota_url).",
            ["lane"], registry=r)
        self.plan_headroom = Gauge(
            "ccp_plan_headroom_ratio", "Quota left in a lane's plan window (quotas.json "
            '"lanes"), 0-1 of its limit, by ccpd\'s own count.', ["lane", "window"], registry=r)
        self.provider_utilization = Gauge(
            "ccp_provider_utilization_ratio", "Utilisation of a lane's plan window as the "
            "provider last reported it (0-1; 1 when it answered that the window is used up).",
            ["lane", "window"], registry=r)
        self.provider_reset = Gauge(
            "ccp_provider_reset_timestamp_seconds", "When the provider said a lane's plan "
            "window resets (epoch seconds).", ["lane", "window"], registry=r)
        self.limit_answers = Counter(
            "ccp_limit_answers", "Limit answers from lanes, by class: window_exhausted, burst, "
            "overloaded, account.", ["lane", "class"], registry=r)
        self.lane_unusable = Gauge(
            "ccp_lane_unusable", "1 while a lane cannot serve until someone acts (an account "
            "problem: balance, fair use, a rejected key), else 0.", ["lane"], registry=r)
        self.lane_up = Gauge(
            "ccp_lane_up", "1 when the lane's last readiness probe answered 200-405, else 0.",
            ["lane"], registry=r)
        self.lane_probe_seconds = Gauge(
            "ccp_lane_probe_seconds", "How long the lane's last readiness probe took.",
            ["lane"], registry=r)

    def team_gauge(self) -> Gauge:
        """``ccp_team_ledger_up``, exported in team mode only (made by the team ledger)."""
        return Gauge("ccp_team_ledger_up", "1 while quota decisions see the team's usage in the "
                     "shared store, 0 while this daemon decides on its own view (the store is "
                     "unreachable, or not read yet at start).", registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(_Sanitised(self.registry))


class _Sanitised:
    """A collector view of a registry with negatives clamped and NaN/Inf samples dropped."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        for family in self._registry.collect():
            family.samples = [
                sample._replace(value=0.0) if sample.value < 0 else sample
                for sample in family.samples
                if not (math.isnan(sample.value) or math.isinf(sample.value))
            ]
            yield family

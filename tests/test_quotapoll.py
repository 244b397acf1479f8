"""The quota poller against the fake's Z.AI quota endpoint, in memory on a Clock: readings from a
good answer, the poll's rhythm, and every way a poll fails (counted, logged without the key, and
never the end of polling); then the parser of the answer on its own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ccpd.config import LaneAuth, LaneConfig
from ccpd.evidence import ProviderEvidence
from ccpd.lanes import Lane
from ccpd.metrics import Metrics
from ccpd.quotapoll import POLL_TIMEOUT_S, QuotaAnswerError, QuotaPoller, parse_zai_quota
from ccpd.testing.fakeupstream import QUOTA_PATH, FakeUpstream

NOW = 1796200000.0
KEY = "zai-quota-key-0123456789abcdef"
POLL_S = 60.0
QUOTA_FIXTURE = Path(__file__).parent.parent / "fixtures" / "zai" / "quota_limit.json"


class Harness:
    """A zai lane (its key from the environment, ``quota_url`` a path on its host) whose client
    is the fake upstream under StubTreq, and a poller for it; all on one Clock."""

    def __init__(self, environ: dict | None = None, on_readings=None):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.fake = FakeUpstream(self.clock)
        self.fake.quota = {"five_hour": 42, "weekly": 10}
        self.stub = StubTreq(self.fake)
        config = LaneConfig(name="zai", base_url="http://zai.test/api/anthropic",
                            auth=LaneAuth("env", "ZAI_KEY"), quota_url=QUOTA_PATH,
                            quota_poll=POLL_S)
        self.lane = Lane(config, self.clock, {"ZAI_KEY": KEY} if environ is None else environ)
        self.lane.client = self.stub
        self.evidence = ProviderEvidence()
        self.metrics = Metrics()
        self.seen: list = []
        self.poller = QuotaPoller([self.lane], self.evidence, self.metrics, self.clock,
                                  on_readings=on_readings or self.seen.append)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()

    def poll(self):
        """One poll, run to its end (an answer in memory needs no time)."""
        results = []
        defer.ensureDeferred(self.poller.poll(self.lane)).addBoth(results.append)
        self.stub.flush()
        assert results, "the poll did not end"
        return results[0]

    def errors(self) -> float:
        return self.metrics.registry.get_sample_value("ccp_quota_poll_errors_total",
                                                      {"lane": "zai"}) or 0.0

    def windows(self) -> dict[str, tuple]:
        return {reading.window: (reading.utilization, reading.reset_at, reading.source)
                for reading in self.evidence.lane_readings("zai", self.clock.seconds())}

    def quota_requests(self) -> list:
        return [r for r in self.fake.requests if r.path == QUOTA_PATH]


@pytest.fixture
def harness():
    return Harness()


@pytest.fixture
def warnings():
    """The formatted text and fields of every warning ccpd.quotapoll logs during the test."""
    events: list[dict] = []

    def observe(event):
        if event.get("log_namespace") == "ccpd.quotapoll" and event.get(
                "log_level") == LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def assert_logged_without_the_key(warnings, *fragments: str) -> None:
    assert len(warnings) == 1, [formatEvent(event) for event in warnings]
    text = formatEvent(warnings[0])
    assert "zai" in text and all(fragment in text for fragment in fragments), text
    assert KEY not in text and KEY not in repr(warnings[0])


def test_a_good_answer_becomes_readings_of_both_windows_with_the_lanes_key(harness):
    readings = harness.poll()
    assert harness.windows() == {"five_hour": (0.42, NOW + 3600, "poll"),
                                 "weekly": (0.10, NOW + 5 * 86400, "poll")}
    assert harness.seen == [readings] and {r.observed_at for r in readings} == {NOW}
    [request] = harness.quota_requests()
    assert (request.method, request.path) == ("GET", QUOTA_PATH)  # on the lane's host root
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "x-api-key" not in request.headers
    assert harness.errors() == 0


def test_reset_times_come_from_next_reset_time_in_milliseconds(harness):
    harness.fake.quota = {"five_hour": 99.5, "weekly": 0, "five_hour_reset": NOW + 1234.5,
                          "weekly_reset": NOW + 7 * 86400}
    harness.poll()
    assert harness.windows() == {"five_hour": (0.995, NOW + 1234.5, "poll"),
                                 "weekly": (0.0, NOW + 7 * 86400, "poll")}


def test_the_poll_repeats_every_quota_poll_seconds_until_the_service_stops(harness):
    harness.poller.startService()
    harness.stub.flush()
    assert len(harness.quota_requests()) == 1  # at once
    harness.advance(POLL_S - 1)
    assert len(harness.quota_requests()) == 1
    harness.fake.quota = {"five_hour": 50, "weekly": 12}
    harness.advance(1)
    assert len(harness.quota_requests()) == 2
    assert harness.windows()["five_hour"][0] == 0.50  # the newer figure
    harness.advance(POLL_S)
    assert len(harness.quota_requests()) == 3
    harness.poller.stopService()
    harness.advance(10 * POLL_S)
    assert len(harness.quota_requests()) == 3
    assert harness.errors() == 0


@pytest.mark.parametrize("mode, reason", [
    ("error", "HTTP 500"),
    ("not-json", "not JSON"),
    ("no-limits", "no data.limits"),
    ("unauthorized", "HTTP 401"),
    ("expired", "code 401: token expired"),  # Z.AI's HTTP 200 with {"code": 401, ...}
])
def test_a_failed_poll_is_counted_and_logged_and_polling_goes_on(harness, warnings, mode,
                                                                  reason):
    harness.fake.quota_mode = mode
    harness.poller.startService()
    harness.stub.flush()
    assert len(harness.quota_requests()) == 1
    assert harness.windows() == {} and harness.seen == []
    assert harness.errors() == 1
    assert_logged_without_the_key(warnings, "quota poll of lane zai failed", reason)

    harness.fake.quota_mode = None  # the endpoint recovers: the next tick reads it
    harness.advance(POLL_S)
    assert len(harness.quota_requests()) == 2
    assert harness.windows()["five_hour"][0] == 0.42
    assert harness.errors() == 1 and len(warnings) == 1
    harness.poller.stopService()


def test_a_hanging_answer_times_out_on_the_clock_and_counts_as_an_error(harness, warnings):
    harness.fake.quota_mode = "hang"
    harness.poller.startService()
    harness.stub.flush()
    assert len(harness.quota_requests()) == 1 and harness.fake.in_flight == 1
    harness.advance(POLL_TIMEOUT_S - 0.5)
    assert harness.errors() == 0 and warnings == []
    harness.advance(0.5)
    assert harness.errors() == 1
    assert_logged_without_the_key(warnings, "quota poll of lane zai failed")
    assert "no answer within 10s" in formatEvent(warnings[0])
    assert harness.fake.in_flight == 0  # the request was given up, not left open
    assert harness.quota_requests()[0].outcome == "cancelled"

    harness.fake.quota_mode = None
    harness.advance(POLL_S - POLL_TIMEOUT_S)  # the next tick keeps the rhythm
    assert len(harness.quota_requests()) == 2
    assert set(harness.windows()) == {"five_hour", "weekly"}
    harness.poller.stopService()


def test_a_missing_credential_is_counted_and_logged_without_a_request(warnings):
    harness = Harness(environ={})
    harness.poller.startService()
    harness.stub.flush()
    assert harness.fake.requests == [] and harness.windows() == {}
    assert harness.errors() == 1
    assert_logged_without_the_key(warnings, "ZAI_KEY is not set")
    harness.advance(POLL_S)
    assert harness.errors() == 2 and len(warnings) == 2  # every tick says so again
    harness.poller.stopService()


def test_only_lanes_with_a_quota_url_are_polled(harness):
    plain = Lane(LaneConfig(name="anthropic", base_url="http://zai.test"), harness.clock, {})
    plain.client = harness.stub
    poller = QuotaPoller([plain, harness.lane], harness.evidence, harness.metrics,
                         harness.clock)
    assert poller.lanes == [harness.lane]
    poller.startService()
    harness.stub.flush()
    assert len(harness.fake.requests) == 1
    poller.stopService()


def test_a_failing_reading_consumer_does_not_stop_the_polling(warnings):
    def consumer(readings):
        raise RuntimeError("the governor broke")

    harness = Harness(on_readings=consumer)
    harness.poller.startService()
    harness.stub.flush()
    harness.advance(POLL_S)
    harness.poller.stopService()
    assert len(harness.quota_requests()) == 2


# -- the answer parser ---------------------------------------------------------------------------

def answer(*limits) -> bytes:
    return json.dumps({"code": 200, "msg": "Operation successful",
                       "data": {"limits": list(limits)}, "success": True}).encode()


def tokens(unit, number, percentage, reset_ms=1796203600000) -> dict:
    return {"type": "TOKENS_LIMIT", "unit": unit, "number": number, "percentage": percentage,
            "nextResetTime": reset_ms}


def by_window(readings) -> dict[str, tuple]:
    return {r.window: (r.utilization, r.reset_at) for r in readings}


def test_the_recorded_answer_parses_to_both_token_windows():
    readings = parse_zai_quota(QUOTA_FIXTURE.read_bytes(), "zai", NOW)
    assert by_window(readings) == {"five_hour": (0.42, 1796203600.0),
                                   "weekly": (0.10, 1796630400.0)}
    assert {(r.lane, r.status, r.observed_at, r.source) for r in readings} == {
        ("zai", None, NOW, "poll")}


@pytest.mark.parametrize("percentage, utilization", [(0, 0.0), (42, 0.42), (100, 1.0),
                                                     (12.5, 0.125), (-3, 0.0)])
def test_percentages_0_to_100_are_utilizations_0_to_1(percentage, utilization):
    [reading] = parse_zai_quota(answer(tokens(3, 5, percentage)), "zai", NOW)
    assert (reading.window, reading.utilization) == ("five_hour", pytest.approx(utilization))


def test_unknown_types_units_and_numbers_are_ignored():
    body = answer({"type": "TIME_LIMIT", "unit": 5, "number": 1, "percentage": 80},
                  tokens(4, 1, 70), tokens(3, 1, 60), tokens(6, 2, 15), "not a limit",
                  {"type": "TOKENS_LIMIT", "unit": 6})
    assert by_window(parse_zai_quota(body, "zai", NOW)) == {"weekly": (0.15, 1796203600.0)}
    with pytest.raises(QuotaAnswerError, match="no token window"):
        parse_zai_quota(answer(tokens(4, 1, 70), tokens(3, 1, 60)), "zai", NOW)


def test_bools_are_not_numbers():
    body = answer(tokens(3, 5, True), tokens(6, 1, 20, reset_ms=True))
    assert by_window(parse_zai_quota(body, "zai", NOW)) == {"weekly": (0.20, None)}
    with pytest.raises(QuotaAnswerError):
        parse_zai_quota(answer(tokens(3, 5, False)), "zai", NOW)


def test_missing_or_odd_reset_times_give_no_reset():
    body = answer(tokens(3, 5, 10, reset_ms=None), tokens(6, 1, 20, reset_ms="soon"))
    assert by_window(parse_zai_quota(body, "zai", NOW)) == {"five_hour": (0.10, None),
                                                             "weekly": (0.20, None)}


@pytest.mark.parametrize("body, reason", [
    (b"<html>502</html>", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "no data.limits"),
    (b'{"code": 200, "data": {}}', "no data.limits"),
    (b'{"code": 200, "data": {"limits": {}}}', "no data.limits"),
    (b'{"code": 401, "msg": "token expired or incorrect", "success": false}',
     "code 401: token expired or incorrect"),
    (b'{"code": 200, "data": {"limits": [{"type": "TOKENS_LIMIT", "unit": 3, "number": 5, '
     b'"percentage": NaN}]}}', "no token window"),
    (b"[" * 100000, "not JSON"),
])
def test_unreadable_answers_are_quota_answer_errors(body, reason):
    with pytest.raises(QuotaAnswerError, match=reason):
        parse_zai_quota(body, "zai", NOW)


def test_an_entry_with_an_unhashable_unit_is_ignored():
    body = answer({"type": "TOKENS_LIMIT", "unit": [3], "number": 5, "percentage": 1},
                  tokens(6, 1, 20))
    assert by_window(parse_zai_quota(body, "zai", NOW)) == {"weekly": (0.20, 1796203600.0)}

"""Limit answers classified, one row per real answer shape (fixtures/limits/answers.json), every
reset source in its order of precision, and the utilisation subscriptions report."""
from __future__ import annotations

import json
from datetime import timezone
from pathlib import Path

import pytest

from ccpd.config import utc_offset
from ccpd.limits import (ACCOUNT, BURST, NOT_A_LIMIT, WINDOW_EXHAUSTED, classify,
                         read_utilization, reset_time)

FIXTURE = json.loads((Path(__file__).parent.parent / "fixtures" / "limits" /
                      "answers.json").read_text(encoding="utf-8"))
NOW = FIXTURE["now"]


def answer_of(row):
    answer = row["answer"]
    return answer["status"], answer["headers"], json.dumps(answer["body"]).encode()


@pytest.mark.parametrize("row", FIXTURE["answers"], ids=lambda row: row["name"])
def test_every_recorded_answer_is_classified_as_recorded(row):
    status, headers, body = answer_of(row)
    got = classify(status, headers, body, NOW, utc_offset(row["lane_reset_tz"]),
                   owns_credentials=row["owns_credentials"])
    expected = row["expected"]
    assert (got.kind, got.window, got.reset_source, got.code) == (
        expected["kind"], expected["window"], expected["reset_source"], expected["code"])
    assert got.reset_at == pytest.approx(expected["reset_at"]) if expected["reset_at"] else \
        got.reset_at is None
    if "utilization" in expected:
        seen, want = read_utilization(headers), expected["utilization"]
        assert (seen.status, seen.reset_at, seen.representative_claim) == (
            want["status"], want["reset_at"], want["representative_claim"])
        for window in ("five_hour", "seven_day"):
            reading = seen.windows[window]
            assert [reading.utilization, reading.reset_at, reading.status,
                    reading.surpassed_threshold] == want[window]


def test_the_fixture_covers_every_class_and_both_zai_shapes():
    kinds = {row["expected"]["kind"] for row in FIXTURE["answers"]}
    assert kinds == {WINDOW_EXHAUSTED, BURST, "overloaded", ACCOUNT, None}
    bodies = [row["answer"]["body"].get("error", {}) for row in FIXTURE["answers"]
              if row["name"].startswith("zai_")]
    assert any(error.get("type", "").isdigit() for error in bodies)          # type = "1308"
    assert any(error.get("type") == "rate_limit_error" and error.get("code") for error in bodies)


@pytest.mark.parametrize("row", [r for r in FIXTURE["answers"]
                                 if r["expected"]["kind"] in (BURST, "overloaded", ACCOUNT)],
                         ids=lambda row: row["name"])
def test_only_window_answers_are_evidence_about_a_quota_window(row):
    status, headers, body = answer_of(row)
    got = classify(status, headers, body, NOW, owns_credentials=row["owns_credentials"])
    assert got.quota_window is None  # no window cooldown, no calibration sample


@pytest.mark.parametrize("window, quota_window", [("five_hour", "rolling"),
                                                  ("seven_day", "weekly"),
                                                  ("seven_day_sonnet", "weekly"),
                                                  ("overage", None)])
def test_provider_windows_map_to_ccpds_windows(window, quota_window):
    headers = {"anthropic-ratelimit-unified-status": "rejected",
               "anthropic-ratelimit-unified-representative-claim": window}
    got = classify(429, headers, b"{}", NOW)
    assert (got.window, got.quota_window) == (window, quota_window)
    assert got.label == f"window_exhausted:{window}"


def test_success_and_non_error_answers_are_not_limits():
    assert classify(200, {"anthropic-ratelimit-unified-status": "rejected"}, b"", NOW) \
        is NOT_A_LIMIT
    assert classify(400, {}, b'{"type":"error","error":{"type":"invalid_request_error"}}',
                    NOW).label == "not_a_limit"
    assert classify(429, {}, b"not json at all \xff", NOW).kind == BURST


# -- reset sources, most precise first ---------------------------------------------------------

ALL_SOURCES = {
    "anthropic-ratelimit-unified-5h-reset": "1000500",
    "anthropic-ratelimit-unified-reset": "1000400",
    "anthropic-ratelimit-tokens-reset": "1970-01-12T14:03:20Z",  # 1001000
    "retry-after-ms": "2500",
    "retry-after": "7",
}
MESSAGE = "Your limit will reset at 1970-01-12 21:50:00"  # +08:00: 1000200


@pytest.mark.parametrize("drop, source, when", [
    ((), "anthropic-ratelimit-unified-5h-reset", 1000500),
    (("anthropic-ratelimit-unified-5h-reset",), "anthropic-ratelimit-unified-reset", 1000400),
    (("anthropic-ratelimit-unified-5h-reset", "anthropic-ratelimit-unified-reset"), "message",
     1000200),
    (("anthropic-ratelimit-unified-5h-reset", "anthropic-ratelimit-unified-reset", "message"),
     "anthropic-ratelimit-tokens-reset", 1001000),
    (("anthropic-ratelimit-unified-5h-reset", "anthropic-ratelimit-unified-reset", "message",
      "anthropic-ratelimit-tokens-reset"), "retry-after-ms", 1000002.5),
    (("anthropic-ratelimit-unified-5h-reset", "anthropic-ratelimit-unified-reset", "message",
      "anthropic-ratelimit-tokens-reset", "retry-after-ms"), "retry-after", 1000007),
])
def test_reset_sources_in_order_of_precision(drop, source, when):
    headers = {name: value for name, value in ALL_SOURCES.items() if name not in drop}
    message = None if "message" in drop else MESSAGE
    got = reset_time(headers, message, 1000000.0, utc_offset("+08:00"), window="five_hour")
    assert got == (pytest.approx(when), source)


def test_retry_after_as_an_http_date_and_garbage():
    assert reset_time({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None, 0) == (
        1445412480.0, "retry-after")
    assert reset_time({"retry-after": "soon", "retry-after-ms": "-5",
                       "anthropic-ratelimit-unified-reset": "nan"}, "reset at never", 0) == (
        None, None)


def test_a_zai_wall_clock_time_is_read_in_the_lanes_zone():
    message = "Usage limit reached for 5 hour. Your limit will reset at 2026-12-02 20:13:59"
    in_beijing = reset_time({}, message, 0, utc_offset("+08:00"))[0]
    in_utc = reset_time({}, message, 0, timezone.utc)[0]
    assert in_utc - in_beijing == 8 * 3600


def test_utilization_is_read_window_by_window_and_new_windows_too():
    reading = read_utilization({
        "anthropic-ratelimit-unified-5h-utilization": "0.5",
        "anthropic-ratelimit-unified-5h-reset": "123",
        "anthropic-ratelimit-unified-7d_oi-utilization": "0.25",
        "anthropic-ratelimit-unified-7d-utilization": "bogus",
        "anthropic-ratelimit-unified-overage-utilization": "0.1",
    })
    assert set(reading.windows) == {"five_hour", "7d_oi"}  # a bad value drops only itself
    assert reading.windows["five_hour"].reset_at == 123
    assert read_utilization({"content-type": "application/json"}) is None

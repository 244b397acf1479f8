"""Provider evidence per lane: newest readings, their age and reset, restore, unusable lanes
and the limits readings imply."""
from __future__ import annotations

from ccpd.evidence import ProviderEvidence, Reading
from ccpd.limits import read_utilization

HEADERS = {
    "anthropic-ratelimit-unified-status": "allowed_warning",
    "anthropic-ratelimit-unified-representative-claim": "five_hour",
    "anthropic-ratelimit-unified-5h-utilization": "0.85",
    "anthropic-ratelimit-unified-5h-reset": "20000",
    "anthropic-ratelimit-unified-5h-status": "allowed_warning",
    "anthropic-ratelimit-unified-7d-utilization": "0.3",
    "anthropic-ratelimit-unified-7d-reset": "600000",
}


def test_the_newest_reading_of_each_window_is_kept_per_lane():
    evidence = ProviderEvidence()
    kept = evidence.observe("anthropic", read_utilization(HEADERS), now=1000)
    assert {(r.window, r.utilization) for r in kept} == {
        ("unified", None), ("five_hour", 0.85), ("seven_day", 0.3)}
    later = dict(HEADERS, **{"anthropic-ratelimit-unified-5h-utilization": "0.9"})
    evidence.observe("anthropic", read_utilization(later), now=1060)
    reading = evidence.reading("anthropic", "five_hour", 1100)
    assert (reading.utilization, reading.age(1100), reading.status) == (0.9, 40, "allowed_warning")
    assert evidence.reading("zai", "five_hour", 1100) is None
    unified = evidence.reading("anthropic", "unified", 1100)
    assert (unified.status, unified.claim, unified.observed_at) == \
        ("allowed_warning", "five_hour", 1060)
    assert set(evidence.fresh("anthropic", 1100)) == {"five_hour", "seven_day"}


def test_a_stale_or_reset_reading_is_not_used():
    evidence = ProviderEvidence()
    evidence.observe("anthropic", read_utilization(HEADERS), now=1000)
    assert evidence.reading("anthropic", "five_hour", 1500, max_age=600) is not None
    assert evidence.reading("anthropic", "five_hour", 1700, max_age=600) is None  # too old
    assert evidence.reading("anthropic", "five_hour", 20000) is None  # its window reset
    assert {r.window for r in evidence.lane_readings("anthropic", 20000)} == {"unified", "seven_day"}
    assert set(evidence.fresh("anthropic", 1500)) == {"five_hour", "seven_day"}  # never lane-wide


def test_restore_keeps_the_newer_of_stored_and_live_readings():
    evidence = ProviderEvidence()
    evidence.put(Reading("zai", "five_hour", 0.5, 9000, None, 2000, "poll"))
    evidence.restore([("zai", "five_hour", 0.2, 9000, None, 1000, "poll"),
                      ("zai", "seven_day", 0.1, 90000, None, 1000, "poll")])
    assert evidence.reading("zai", "five_hour", 2100).utilization == 0.5
    assert evidence.reading("zai", "seven_day", 2100).to_row() == (
        "zai", "seven_day", 0.1, 90000, None, 1000, "poll", None, None)


def test_unusable_lanes_are_news_once():
    evidence = ProviderEvidence()
    assert evidence.mark_unusable("zai", "1113 insufficient balance")
    assert not evidence.mark_unusable("zai", "1113 again")
    assert evidence.unusable == {"zai": "1113 again"}
    assert evidence.mark_usable("zai") and not evidence.mark_usable("zai")


def test_learned_limit_grows_confident_as_samples_agree():
    evidence = ProviderEvidence()
    evidence.learn("zai", "five_hour", 100_000, 0.01)   # too little used to say anything
    assert evidence.learned_limit("zai", "five_hour") is None
    evidence.learn("zai", "five_hour", 200_000, 0.1)
    first = evidence.learned_limit("zai", "five_hour")
    assert (first.tokens, first.samples, first.confidence) == (2_000_000, 1, 0.0)
    for used in range(2, 12):
        evidence.learn("zai", "five_hour", 200_000 * used, 0.1 * used)
    learned = evidence.learned_limit("zai", "five_hour")
    assert learned.tokens == 2_000_000 and learned.samples == 11 and learned.confidence == 1.0
    evidence.learn("zai", "seven_day", 1_000_000, 0.5)
    evidence.learn("zai", "seven_day", 1_000_000, 0.1)  # disagreeing samples
    assert evidence.learned_limit("zai", "seven_day").confidence < 0.2


def test_fresh_readings_and_the_judgement_they_give():
    evidence = ProviderEvidence(max_age=600, block_at=0.98)
    evidence.put(Reading("zai", "five_hour", 0.85, 9000, None, 1000, "poll"))
    evidence.put(Reading("zai", "weekly", 0.2, 90000, None, 1000, "poll"))
    assert evidence.judge("zai", 1100, warn_at=0.8) == (
        "warn", "provider reports five_hour of lane zai at 85%", {"rolling", "weekly"})
    assert evidence.judge("zai", 1100, warn_at=0.9)[0] == "ok"
    assert evidence.judge("zai", 1601, warn_at=0.8) == ("ok", "", set())  # too old
    # the provider's "used up" holds until its reset, however old
    evidence.put(Reading("zai", "five_hour", 1.0, 9000, "rejected", 1000, "limit"))
    assert evidence.judge("zai", 8999, warn_at=0.8)[0] == "block"
    assert evidence.judge("zai", 9000, warn_at=0.8)[0] == "ok"


def test_a_reading_is_news_when_it_changes_or_a_minute_passed():
    saved = Reading("zai", "five_hour", 0.50, 9000, "allowed", 1000)
    same = Reading("zai", "five_hour", 0.505, 9000, "allowed", 1030)
    assert same.news_since(None) and not same.news_since(saved)
    assert Reading("zai", "five_hour", 0.51, 9000, "allowed", 1030).news_since(saved)
    assert Reading("zai", "five_hour", 0.50, 9000, "rejected", 1030).news_since(saved)
    assert Reading("zai", "five_hour", 0.50, 9000, "allowed", 1060).news_since(saved)


def test_the_lane_wide_overage_status_is_shown_but_an_exhausted_overage_window_blocks():
    evidence = ProviderEvidence(max_age=600, block_at=0.98)
    headers = dict(HEADERS, **{"anthropic-ratelimit-unified-status": "allowed",
                               "anthropic-ratelimit-unified-overage-status": "rejected"})
    evidence.observe("anthropic", read_utilization(headers), now=1000)
    assert evidence.reading("anthropic", "overage_status", 1100).status == "rejected"
    assert evidence.judge("anthropic", 1100, warn_at=0.9)[0] == "ok"  # no extra usage, that is all
    # a limit answer claiming the overage window: used up until its reset
    evidence.put(Reading("anthropic", "overage", 1.0, 5000, "rejected", 1100, "limit"))
    assert evidence.judge("anthropic", 1200, warn_at=0.9)[:2] == (
        "block", "provider reports overage of lane anthropic rejected")

"""Usage extraction: SSE parsing under any chunking, JSON bodies, Z.AI headers and errors."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ccpd.testing.fakeupstream import message_events
from ccpd.usage import (MAX_SSE_LINE, SSEEvent, SSEParser, StreamAccountant, TokenUsage,
                        UsageRecord, merge_header_usage, usage_from_headers, usage_from_json)

USAGE = {"input_tokens": 11, "cache_creation_input_tokens": 25, "cache_read_input_tokens": 300}
STREAM = b"".join(message_events("claude-sonnet-4-5", USAGE, 9))


def parse_all(chunks) -> list[SSEEvent]:
    parser = SSEParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# -- SSE parser ---------------------------------------------------------------------------------

def test_parser_follows_the_whatwg_field_rules():
    stream = (b"\xef\xbb\xbf: a comment\n"
              b"event: one\ndata: a\ndata:b\nid: 7\nretry: 10\nunknown: x\n\n"
              b"data\n\n"                      # field with no colon: empty data
              b"event: lonely\n\n"             # no data: not dispatched, type reset
              b"data:  two spaces\r\n\r\n"
              b"data: cr only\r\r")
    assert parse_all([stream]) == [
        SSEEvent("one", "a\nb", "7"),
        SSEEvent("message", "", "7"),
        SSEEvent("message", " two spaces", "7"),
        SSEEvent("message", "cr only", "7"),
    ]


def test_an_unfinished_event_is_not_dispatched():
    assert parse_all([b"event: x\ndata: y\n"]) == []


def test_crlf_cut_between_cr_and_lf_is_one_line_end():
    assert parse_all([b"data: a\r", b"\n\r", b"\n"]) == [SSEEvent("message", "a")]


def test_a_line_too_long_to_keep_is_dropped_and_its_event_marked():
    """A 3 MiB line arriving in 4 KiB pieces (the way a socket delivers it): the parser holds
    at most MAX_SSE_LINE of it, marks the event, and reads the events after it as usual."""
    parser = SSEParser()
    line = b"data: " + b"x" * (3 * MAX_SSE_LINE)
    events = parser.feed(b"event: content_block_delta\n")
    for start in range(0, len(line), 4096):
        events += parser.feed(line[start:start + 4096])
        assert sum(map(len, parser._pending)) <= MAX_SSE_LINE + 4096
    events += parser.feed(b"\n\ndata: after\n\n")
    assert events == [SSEEvent("content_block_delta", "", None, truncated=True),
                      SSEEvent("message", "after")]


def test_a_line_just_under_the_limit_is_kept_whole():
    line = b"data: " + b"y" * (MAX_SSE_LINE - 6)
    assert parse_all([line[:1000], line[1000:], b"\n\n"]) == [
        SSEEvent("message", "y" * (MAX_SSE_LINE - 6))]


def test_an_accounted_event_too_long_to_read_is_an_anomaly():
    accountant = StreamAccountant()
    accountant.feed(b"event: message_delta\ndata: {" + b" " * MAX_SSE_LINE + b"}\n\n")
    assert accountant.anomaly == f"message_delta event has a line over {MAX_SSE_LINE} bytes: not read"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40),
       st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_chunking_gives_the_same_events_and_usage(points, eol):
    stream = STREAM.replace(b"\n", eol)
    whole = parse_all([stream])
    assert parse_all(cut(stream, points)) == whole
    assert [e.event for e in whole].count("content_block_delta") == 9

    accountant = StreamAccountant()
    for chunk in cut(stream, points):
        accountant.feed(chunk)
    assert accountant.usage == TokenUsage(11, 9, 25, 300)
    assert accountant.served_model == "claude-sonnet-4-5"
    assert accountant.events == len(whole) and accountant.anomaly is None


# -- stream accounting ---------------------------------------------------------------------------

def sse(event: str | None, payload) -> bytes:
    head = f"event: {event}\n" if event else ""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{head}data: {data}\n\n".encode()


def test_first_delta_is_noticed_and_last_cumulative_output_wins():
    accountant = StreamAccountant()
    accountant.feed(sse("message_start", {"type": "message_start", "message": {
        "model": "glm-4.6", "usage": {"input_tokens": 5, "output_tokens": 1}}}))
    assert not accountant.first_delta_seen
    accountant.feed(sse("content_block_delta", {"type": "content_block_delta"}))
    assert accountant.first_delta_seen
    accountant.feed(sse("message_delta", {"usage": {"output_tokens": 3}}))
    accountant.feed(sse("message_delta", {"usage": {"output_tokens": 8, "input_tokens": 6}}))
    assert accountant.usage == TokenUsage(input_tokens=6, output_tokens=8)


def test_events_without_event_line_are_typed_by_their_data():
    accountant = StreamAccountant()
    accountant.feed(sse(None, {"type": "message_start", "message": {
        "usage": {"input_tokens": 4}}}))
    accountant.feed(sse(None, {"type": "content_block_delta", "delta": {}}))
    accountant.feed(sse(None, {"type": "message_delta", "usage": {"output_tokens": 2}}))
    assert accountant.usage == TokenUsage(4, 2) and accountant.first_delta_seen


def test_error_events_give_the_error_type():
    accountant = StreamAccountant()
    accountant.feed(sse("error", {"type": "error", "error": {"type": "overloaded_error"}}))
    assert accountant.error_type == "overloaded_error"
    zai = StreamAccountant()
    zai.feed(sse("error", {"error": {"code": 1308, "message": "limit"}}))
    assert zai.error_type == "1308"


def test_broken_usage_is_an_anomaly_not_an_exception():
    accountant = StreamAccountant()
    accountant.feed(sse("message_start", "{not json"))
    assert accountant.anomaly.startswith("message_start event is not JSON")
    odd = StreamAccountant()
    odd.feed(sse("message_delta", {"usage": {"output_tokens": "many"}}))
    assert "output_tokens" in odd.anomaly and odd.usage == TokenUsage()


def test_a_stream_without_usage_leaves_zeros():
    accountant = StreamAccountant()
    accountant.feed(sse("ping", {"type": "ping"}) + sse("message_stop", {}))
    assert accountant.usage == TokenUsage() and accountant.anomaly is None


# -- JSON bodies and headers ----------------------------------------------------------------------

def test_json_answer_usage_and_model():
    body = json.dumps({"type": "message", "model": "claude-x", "usage": {
        "input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 7,
        "cache_creation_input_tokens": None}}).encode()
    assert usage_from_json(body) == (TokenUsage(10, 20, 0, 7), "claude-x", None, None)


def test_json_errors_anthropic_and_zai():
    anthropic = json.dumps({"type": "error", "error": {"type": "rate_limit_error"}}).encode()
    assert usage_from_json(anthropic)[2] == "rate_limit_error"
    zai = json.dumps({"error": {"code": "1310", "message": "weekly limit"}}).encode()
    assert usage_from_json(zai)[2] == "1310"


def test_json_absent_or_broken_usage():
    assert usage_from_json(b"") == (TokenUsage(), None, None, None)
    assert usage_from_json(b'{"type": "message"}') == (TokenUsage(), None, None, None)
    assert usage_from_json(b"<html>")[3].startswith("answer is not JSON")
    assert usage_from_json(b"[1]")[3] == "answer is not a JSON object"


def test_usage_headers_in_their_several_spellings():
    assert usage_from_headers({"x-usage-input-tokens": "5", "x-usage-output-tokens": "6"}) == \
        TokenUsage(5, 6)
    assert usage_from_headers({"x-prompt-tokens": "7", "x-completion-tokens": "8",
                               "x-cached-tokens": "2"}) == TokenUsage(7, 8, 0, 2)
    assert usage_from_headers({"x-input-tokens": "lots"}) == TokenUsage()


def test_body_usage_wins_and_headers_fill_the_gaps():
    assert merge_header_usage(TokenUsage(10, 0), TokenUsage(3, 4)) == TokenUsage(10, 4)


def test_usage_record_has_every_schema_field_with_neutral_policy_values():
    record = UsageRecord(ts=1.5, rid="r", model="m", served_model="m", lane="l", op="messages",
                         stream=False, status=200).to_dict()
    assert list(record) == [
        "ts", "rid", "model", "served_model", "lane", "op", "stream", "status", "input_tokens",
        "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "ttft_ms",
        "stream_ms", "dirty_ms", "err_type", "upstream", "reroute_mode", "reroute_decision",
        "decision_reason", "reroute_attempt", "preferred_attempt", "quota_headroom_pct",
        "headroom_pct_rolling", "headroom_pct_weekly", "quota_warn_threshold",
        "cooldown_active", "cooldown_next_ts", "wasted_retry_ms", "warn_pct_auto",
        "gap_seconds_p50", "gap_seconds_p95", "gap_samples", "header_mode", "upstream_model",
        "limit_class", "provider_utilization_5h", "provider_utilization_7d"]
    assert (record["reroute_decision"], record["reroute_attempt"], record["preferred_attempt"],
            record["cooldown_active"], record["wasted_retry_ms"]) == ("preferred", 0, True,
                                                                       False, 0)

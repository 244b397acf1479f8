"""The proxy as a client sees it: bytes, status codes, headers, log lines.

Request logic (header rules, routing, ccpd's own answers, timeouts, readiness, stopping) runs
in memory on a Clock (:func:`tests.support.build_memory_ccpd`). Streaming to real clients,
disconnects and the official anthropic SDK (run in a thread, since it blocks) run on loopback
sockets, against a fake upstream of ours.
"""
from __future__ import annotations

import json

import anthropic
import pytest_twisted
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseFailed

from ccpd import tap
# post, until, free_port and the constants are imported from here by modules written before
# tests/support.py existed
from tests.support import (MESSAGE, SECRET, UPSTREAM_URL, ZAI_SECRET, free_port,  # noqa: F401
                           logged_failures, post, until)


def sdk(ccpd, **kwargs):
    return anthropic.Anthropic(base_url=ccpd.url, api_key=SECRET, max_retries=0, timeout=10,
                               **kwargs)


# -- the official SDK as a client (loopback) ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sdk_non_streaming_message_is_proxied_and_accounted(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    client = sdk(ccpd)
    message = await deferToThread(
        client.messages.create, **MESSAGE,
        extra_headers={"x-fake-input-tokens": "42", "x-fake-events": "7"})
    assert message.usage.input_tokens == 42 and message.usage.output_tokens == 7
    assert message.content[0].type == "text"
    [line] = ccpd.usage_lines()
    assert (line["model"], line["lane"], line["op"], line["stream"], line["status"]) == \
        ("claude-sonnet-4-5", "anthropic", "messages", False, 200)
    assert (line["input_tokens"], line["output_tokens"]) == (42, 7)
    # passthrough lane: the client's own credentials went upstream (this SDK sends a bearer token)
    sent = fake_upstream.requests[-1].headers
    assert SECRET in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))


@pytest_twisted.ensureDeferred
async def test_sdk_stream_gets_every_event_and_usage_is_logged(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    client = sdk(ccpd)

    def run_stream():
        with client.messages.stream(**MESSAGE, extra_headers={
                "x-fake-input-tokens": "11", "x-fake-events": "9",
                "x-fake-cache-read": "300", "x-fake-cache-creation": "25"}) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    text, final = await deferToThread(run_stream)
    assert text
    assert final.usage.output_tokens == 9 and final.usage.cache_read_input_tokens == 300
    [line] = ccpd.usage_lines()
    assert line["stream"] is True and line["status"] == 200
    assert (line["input_tokens"], line["output_tokens"], line["cache_read_input_tokens"],
            line["cache_creation_input_tokens"]) == (11, 9, 300, 25)
    assert line["ttft_ms"] >= 0 and line["dirty_ms"] >= line["stream_ms"] >= 0
    assert line["served_model"] == "claude-sonnet-4-5"
    assert line["reroute_decision"] == "preferred" and line["preferred_attempt"] is True


# -- streams on the wire (loopback) -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stream_bytes_are_identical_to_the_upstream_bytes(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    body = {**MESSAGE, "stream": True}
    headers = {"x-fake-events": "25"}
    direct = await post(fake_upstream.url() + "/v1/messages", body, headers)
    direct_bytes = await direct.content()
    proxied = await post(ccpd.url + "/v1/messages", body, headers)
    proxied_bytes = await proxied.content()
    assert proxied.code == 200
    assert proxied.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    assert proxied.headers.getRawHeaders("content-length") is None
    assert proxied_bytes == direct_bytes
    assert proxied_bytes.count(b"event: content_block_delta") == 25


class _Collect(Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(reason)


async def open_stream(ccpd, headers) -> _Collect:
    """A streamed request whose body arrives in a reader as it comes, not all at the end."""
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "stream": True}, headers,
                          unbuffered=True)
    reader = _Collect()
    response.deliverBody(reader)
    return reader


@pytest_twisted.ensureDeferred
async def test_events_reach_the_client_while_the_upstream_is_still_streaming(
        fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    reader = await open_stream(ccpd, {"x-fake-scenario": "hang-after-headers"})
    await until(lambda: b"message_start" in reader.data)
    assert fake_upstream.in_flight == 1  # nothing was held back waiting for the end
    reader.transport.stopProducing()
    await until(lambda: fake_upstream.in_flight == 0)


@pytest_twisted.ensureDeferred
async def test_stream_broken_mid_way_ends_with_an_error_event(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "stream": True},
                          {"x-fake-scenario": "die-mid-stream"})
    body = await response.content()
    assert body.count(b"event: content_block_delta") == 2
    assert body.rstrip().split(b"\n\n")[-1].startswith(b"event: error\ndata: ")
    [line] = ccpd.usage_lines()
    assert line["err_type"] == "api_error"
    assert ccpd.anomaly_lines()[0]["kind"] == "upstream_broken"


@pytest_twisted.ensureDeferred
async def test_stream_gone_silent_on_a_real_connection_ends_with_a_timeout_event(
        fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), extra=(
        f"[lane:quick]\nbase_url = {fake_upstream.url()}\nidle_timeout_s = 0.2\n"
        "[routing]\ndefault_lane = quick\n"))
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "stream": True},
                          {"x-fake-scenario": "hang-after-headers"})
    body = await response.content()
    last = body.rstrip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\n")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "timeout_error"
    await until(lambda: fake_upstream.cancelled == 1)  # the upstream connection was closed


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_the_upstream_request(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    reader = await open_stream(ccpd, {"x-fake-events": "1000", "x-fake-interval-ms": "20"})
    await until(lambda: reader.data.count(b"content_block_delta") >= 2)
    reader.transport.loseConnection()
    await until(lambda: fake_upstream.cancelled == 1 and fake_upstream.in_flight == 0)
    await until(lambda: len(ccpd.usage_lines()) == 1)
    [line] = ccpd.usage_lines()
    assert line["status"] == 499 and line["err_type"] == "client_disconnected"
    # the provider charged the prompt: message_start's usage is accounted all the same
    assert line["input_tokens"] == 12 and line["output_tokens"] == 1


@pytest_twisted.ensureDeferred
async def test_stop_lets_requests_in_flight_on_real_connections_finish(fake_upstream,
                                                                        start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    reader = await open_stream(ccpd, {"x-fake-events": "8", "x-fake-interval-ms": "10"})
    await until(lambda: b"content_block_delta" in reader.data)
    await ccpd.service.stopService()
    await until(lambda: reader.done.called)
    assert reader.data.rstrip().endswith(b'data: {"type":"message_stop"}')
    [line] = ccpd.usage_lines()
    assert line["status"] == 200 and line["output_tokens"] == 8


# -- header rules and routing (in memory) -------------------------------------------------------

def test_query_string_and_header_rules(memory_ccpd):
    ccpd = memory_ccpd()
    echoed = ccpd.post("/v1/messages?beta=true", MESSAGE, {
        "x-fake-scenario": "echo", "anthropic-beta": "tools-2024", "connection": "x-drop-me",
        "x-drop-me": "1", "te": "trailers", "proxy-authorization": "Basic Zm9v"}).json()
    assert echoed["query"] == "beta=true" and echoed["path"] == "/v1/messages"
    headers = echoed["headers"]
    assert headers["anthropic-beta"] == "tools-2024"
    assert headers["x-api-key"] == SECRET
    for dropped in ("x-drop-me", "te", "proxy-authorization"):
        assert dropped not in headers
    assert headers["accept-encoding"] == "identity"


def test_env_lane_replaces_client_credentials(memory_ccpd):
    ccpd = memory_ccpd()
    echoed = ccpd.post("/v1/messages", {**MESSAGE, "model": "glm-4.6"}, {
        "x-fake-scenario": "echo", "authorization": f"Bearer {SECRET}"}).json()
    assert echoed["path"] == "/api/anthropic/v1/messages"
    assert echoed["headers"]["x-api-key"] == ZAI_SECRET
    assert "authorization" not in echoed["headers"]
    [line] = ccpd.usage_lines()
    assert line["lane"] == "zai" and line["model"] == "glm-4.6"
    assert line["header_mode"] == "env"


def test_bearer_env_lane_sends_authorization(memory_ccpd):
    ccpd = memory_ccpd(extra=(
        f"[lane:bearer]\nbase_url = {UPSTREAM_URL}\nauth = bearer-env:ZAI_TEST_KEY\n"
        "[routing]\ndefault_lane = bearer\n"))
    echoed = ccpd.get("/v1/models", {"x-fake-scenario": "echo", "x-api-key": SECRET}).json()
    assert echoed["headers"]["authorization"] == f"Bearer {ZAI_SECRET}"
    assert "x-api-key" not in echoed["headers"]


def test_count_tokens_and_other_paths(memory_ccpd):
    ccpd = memory_ccpd()
    counted = ccpd.post("/v1/messages/count_tokens", MESSAGE, {"x-fake-input-tokens": "77"})
    assert counted.json() == {"input_tokens": 77}
    models = ccpd.get("/v1/models")
    assert models.code == 200 and models.json()["data"][0]["id"] == "fake-model"
    assert [(r.method, r.path) for r in ccpd.upstream.requests] == \
        [("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models")]
    ops = [(line["op"], line["input_tokens"]) for line in ccpd.usage_lines()]
    assert ops == [("count_tokens", 0), ("passthrough", 0)]


def test_upstream_errors_pass_through_untouched(memory_ccpd):
    ccpd = memory_ccpd()
    headers = {"x-fake-status": "429"}
    direct = ccpd.post(UPSTREAM_URL + "/v1/messages", MESSAGE, headers)
    proxied = ccpd.post("/v1/messages", MESSAGE, headers)
    assert proxied.code == 429 and proxied.header("retry-after") == "30"
    assert proxied.json() == direct.json()
    [line] = ccpd.usage_lines()
    assert line["status"] == 429 and line["err_type"] == "rate_limit_error"
    assert [a["kind"] for a in ccpd.anomaly_lines()] == ["upstream_error"]


# -- ccpd's own answers (in memory) -------------------------------------------------------------

def test_non_json_body_is_400(memory_ccpd):
    ccpd = memory_ccpd()
    for body in (b"{nope", b"[1, 2]"):
        answer = ccpd.post("/v1/messages", body)
        assert answer.error() == (400, "invalid_request_error")
        assert "request body is not valid JSON" in answer.json()["error"]["message"]
    assert ccpd.upstream.requests == []
    assert [(line["status"], line["err_type"], line["lane"]) for line in ccpd.usage_lines()] == \
        [(400, "invalid_request_error", "")] * 2
    assert ccpd.anomaly_lines() == []  # a client's mistake is no anomaly of ccpd's


def test_oversized_body_is_413(memory_ccpd):
    ccpd = memory_ccpd()
    big = json.dumps({**MESSAGE, "pad": "x" * 70000}).encode()
    answer = ccpd.post("/v1/messages", big)
    assert answer.error() == (413, "request_too_large")
    assert "65536 bytes" in answer.json()["error"]["message"]
    assert ccpd.upstream.requests == []
    [line] = ccpd.usage_lines()
    assert (line["status"], line["err_type"]) == (413, "request_too_large")


def test_a_body_at_the_limit_is_served(memory_ccpd):
    ccpd = memory_ccpd()
    body = json.dumps({**MESSAGE, "pad": ""}).encode()
    body = json.dumps({**MESSAGE, "pad": "x" * (65536 - len(body))}).encode()
    assert len(body) == 65536
    assert ccpd.post("/v1/messages", body).code == 200
    assert len(ccpd.upstream.requests[0].body) == 65536


def test_unreachable_lane_is_502(memory_ccpd):
    ccpd = memory_ccpd(upstream_url="http://unreachable.test")
    answer = ccpd.post("/v1/messages", MESSAGE)
    assert answer.error() == (502, "api_error")
    assert "lane 'anthropic' could not be reached" in answer.json()["error"]["message"]
    [line] = ccpd.usage_lines()
    assert line["status"] == 502 and line["err_type"] == "api_error"


def test_silent_lane_is_504_after_its_idle_timeout(memory_ccpd):
    ccpd = memory_ccpd()  # idle_timeout_s = 2 in the test config
    sent = ccpd.send_post("/v1/messages", MESSAGE, {"x-fake-scenario": "hang"})
    ccpd.advance(1.9)
    assert not sent.called and ccpd.upstream.in_flight == 1
    ccpd.advance(0.1)
    answer = ccpd.settle(sent)
    assert answer.error() == (504, "timeout_error")
    assert "sent no answer within 2s" in answer.json()["error"]["message"]
    assert (ccpd.upstream.cancelled, ccpd.upstream.in_flight) == (1, 0)  # the request was dropped
    [line] = ccpd.usage_lines()
    assert (line["status"], line["err_type"], line["dirty_ms"]) == (504, "timeout_error", 2000)


def test_missing_lane_key_is_502_naming_the_variable(memory_ccpd):
    ccpd = memory_ccpd(environ={})
    answer = ccpd.post("/v1/messages", {**MESSAGE, "model": "glm-4.6"})
    assert answer.error() == (502, "api_error")
    assert "ZAI_TEST_KEY is not set" in answer.json()["error"]["message"]
    assert ccpd.upstream.requests == []


def test_stream_gone_silent_ends_with_a_timeout_event(memory_ccpd):
    ccpd = memory_ccpd()
    sent = ccpd.send_post("/v1/messages", {**MESSAGE, "stream": True},
                          {"x-fake-scenario": "hang-after-headers"})
    ccpd.advance(1.9)
    assert not sent.called
    ccpd.advance(0.1)
    answer = ccpd.settle(sent)
    assert answer.code == 200  # the headers went out before the upstream fell silent
    first, last = answer.body.rstrip().split(b"\n\n")
    assert first.startswith(b"event: message_start\n") and last.startswith(b"event: error\n")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "timeout_error"
    assert ccpd.upstream.cancelled == 1
    [line] = ccpd.usage_lines()
    assert (line["status"], line["err_type"], line["input_tokens"]) == (200, "timeout_error", 12)
    assert ccpd.anomaly_lines()[0]["kind"] == "upstream_broken"


# -- stopping (in memory: the grace runs on the clock) ------------------------------------------

def test_stop_lets_requests_in_flight_finish_and_logs_them(memory_ccpd):
    ccpd = memory_ccpd()
    sent = ccpd.send_post("/v1/messages", {**MESSAGE, "stream": True},
                          {"x-fake-events": "20", "x-fake-interval-ms": "100"})
    ccpd.advance(0.5, step=0.1)
    stopped = ccpd.service.stopService()
    ccpd.advance(1.0, step=0.1)
    assert not stopped.called and not sent.called  # 1.5 s into a 2.6 s stream (26 events)
    ccpd.advance(1.1, step=0.1)
    assert stopped.called
    assert ccpd.settle(sent).body.rstrip().endswith(b'data: {"type":"message_stop"}')
    [line] = ccpd.usage_lines()
    assert line["status"] == 200 and line["output_tokens"] == 20


def test_stop_cuts_off_endless_requests_after_the_grace_and_still_logs_them(memory_ccpd):
    ccpd = memory_ccpd()
    sent = ccpd.send_post("/v1/messages", {**MESSAGE, "stream": True},
                          {"x-fake-events": "1000", "x-fake-interval-ms": "1000"})
    ccpd.advance(1)
    stopped = ccpd.service.stopService()
    ccpd.advance(tap.STOP_GRACE_S - 1, step=1)
    assert not stopped.called and not sent.called
    ccpd.advance(1, step=1)
    assert stopped.called
    ccpd.failure_of(sent).trap(ResponseFailed)  # the client sees a cut answer, not an end
    assert ccpd.upstream.in_flight == 0 and ccpd.upstream.cancelled == 1
    [line] = ccpd.usage_lines()
    assert (line["status"], line["err_type"]) == (499, "client_disconnected")
    assert line["input_tokens"] == 12 and line["output_tokens"] == 1  # as of message_start
    assert line["dirty_ms"] == (tap.STOP_GRACE_S + 1) * 1000


# -- ops endpoints (in memory) ------------------------------------------------------------------

def test_healthz(memory_ccpd):
    ccpd = memory_ccpd()
    answer = ccpd.get("/healthz")
    assert answer.code == 200 and answer.json() == {"status": "ok"}
    assert answer.header("content-type") == "application/json"


def test_lanes_are_probed_on_their_own_and_readyz_answers_from_the_latest(memory_ccpd):
    ccpd = memory_ccpd()  # probe_interval: the default 30 s
    assert ccpd.upstream.probes == 2  # each lane once at start, before anyone asked
    assert ccpd.metric("ccp_lane_up", lane="anthropic") == 1.0
    assert ccpd.metric("ccp_lane_probe_seconds", lane="zai") == 0.0  # on a Clock, no time
    first = ccpd.get("/readyz")
    body = first.json()
    assert first.code == 200 and body["ready"] is True
    assert set(body["lanes"]) == {"anthropic", "zai"}
    assert body["lanes"]["anthropic"]["probe_seconds"] == 0.0
    ccpd.advance(29)
    assert ccpd.get("/readyz").code == 200
    assert ccpd.upstream.probes == 2  # answered from the probers' results
    ccpd.advance(1)
    assert ccpd.upstream.probes == 4  # the probers, every 30 s, with no /readyz
    # a prober that stopped (or is late): /readyz probes that lane itself, once
    ccpd.service.getServiceNamed("lane-prober:zai").stopService()
    ccpd.advance(31)
    assert ccpd.upstream.probes == 5
    assert ccpd.get("/readyz").code == 200 and ccpd.upstream.probes == 6
    assert ccpd.get("/readyz").code == 200 and ccpd.upstream.probes == 6


def test_readyz_names_the_failing_lane(memory_ccpd):
    ccpd = memory_ccpd(zai_url="http://unreachable.test")
    answer = ccpd.get("/readyz")
    body = answer.json()
    assert answer.code == 503 and body["failing"] == ["zai"]
    assert body["lanes"]["anthropic"]["up"] is True
    assert "ConnectionRefusedError" in body["lanes"]["zai"]["error"]
    assert ccpd.metric("ccp_lane_up", lane="zai") == 0.0
    assert ccpd.metric("ccp_lane_up", lane="anthropic") == 1.0


def test_readyz_counts_a_404_probe_as_up(memory_ccpd):
    # "Provider policy": any answer from 200 to 405 proves the lane is there.
    ccpd = memory_ccpd(extra=f"[lane:other]\nbase_url = {UPSTREAM_URL}\n"
                             "probe_path = /v1/no-such-thing\n")
    answer = ccpd.get("/readyz")
    assert answer.code == 200 and answer.json()["lanes"]["other"]["status"] == 404


def test_metrics_after_traffic(memory_ccpd):
    ccpd = memory_ccpd()
    sent = ccpd.send_post("/v1/messages", MESSAGE, {"x-fake-input-tokens": "5",
                                                    "x-fake-events": "3",
                                                    "x-fake-first-byte-ms": "300"})
    ccpd.advance(0.3)
    assert ccpd.settle(sent).code == 200
    labels = {"lane": "anthropic", "model": "claude-sonnet-4-5"}
    assert ccpd.metric("ccp_requests_total", **labels, status="200") == 1.0
    assert ccpd.metric("ccp_tokens_total", **labels, kind="input") == 5.0
    assert ccpd.metric("ccp_tokens_total", **labels, kind="output") == 3.0
    assert ccpd.metric("ccp_request_duration_seconds_sum", **labels) == 0.3
    assert ccpd.metric("ccp_ttft_seconds_bucket", **labels, le="0.25") == 0.0
    assert ccpd.metric("ccp_ttft_seconds_bucket", **labels, le="0.5") == 1.0
    # and the exposition carries them, as Prometheus reads it
    answer = ccpd.get("/metrics")
    text = answer.body.decode()
    assert answer.header("content-type").startswith("text/plain")
    assert ('ccp_requests_total{lane="anthropic",model="claude-sonnet-4-5",status="200"} 1.0'
            in text)
    assert 'ccp_tokens_total{kind="input",lane="anthropic",model="claude-sonnet-4-5"} 5.0' in text
    assert "ccp_request_duration_seconds_bucket" in text and "ccp_ttft_seconds_count" in text


def test_unknown_route_is_an_anthropic_shaped_404(memory_ccpd):
    ccpd = memory_ccpd()
    answer = ccpd.get("/nope")
    assert answer.error() == (404, "not_found_error")
    assert answer.json()["error"]["message"] == "ccpd has no route for /nope"


def test_a_wrong_method_is_an_anthropic_shaped_405(memory_ccpd):
    ccpd = memory_ccpd()
    for method, path in (("POST", "/healthz"), ("DELETE", "/metrics"), ("PUT", "/readyz")):
        answer = ccpd.request(method, path)
        assert answer.error() == (405, "invalid_request_error"), (method, path)
        assert answer.json()["error"]["message"] == f"{method} is not allowed on {path}"


def test_a_bug_on_the_hot_route_is_an_anthropic_shaped_500_and_a_logged_failure(memory_ccpd):
    ccpd = memory_ccpd()

    def broken(route):
        raise RuntimeError("a bug")

    ccpd.service.app.governor.decide = broken
    with logged_failures() as failures:
        answer = ccpd.post("/v1/messages", MESSAGE)
    assert answer.error() == (500, "api_error")
    assert answer.json()["error"]["message"] == "internal error in ccpd; see its log"
    assert [event["log_failure"].value.args for event in failures] == [("a bug",)]
    assert ccpd.upstream.requests == []
    # beside the two hot routes, Klein's routes as before: other methods and paths pass through
    ccpd.request("GET", "/v1/messages/count_tokens")
    ccpd.post("/v1/messagesx", MESSAGE)
    assert [(r.method, r.path) for r in ccpd.upstream.requests] == [
        ("GET", "/v1/messages/count_tokens"), ("POST", "/v1/messagesx")]

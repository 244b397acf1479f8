"""The proxy on real loopback sockets: a fake upstream of ours, ccpd in-process, and clients
that are treq (for exact bytes) or the official anthropic SDK (run in a thread, since it
blocks). What is asserted is what a user sees: bytes, status codes, headers, log lines.
"""
from __future__ import annotations

import json
import socket

import anthropic
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread

from ccpd import tap

SECRET = "sk-ant-client-secret-0123456789"
ZAI_SECRET = "zai-secret-key-123"


def sdk(ccpd, **kwargs):
    return anthropic.Anthropic(base_url=ccpd.url, api_key=SECRET, max_retries=0, timeout=10,
                               **kwargs)


async def post(url, body, headers=None, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", "x-api-key": SECRET, **(headers or {})}
    return await treq.post(url, data=data, headers=hdrs, **kwargs)


async def until(predicate, timeout=5.0):
    """Wait (bounded) on the reactor until ``predicate()`` is true."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": "hello"}]}


# -- the official SDK as a client --------------------------------------------------------------

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


# -- bytes on the wire -------------------------------------------------------------------------

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
async def test_query_string_and_header_rules(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    response = await post(ccpd.url + "/v1/messages?beta=true", MESSAGE, {
        "x-fake-scenario": "echo", "anthropic-beta": "tools-2024", "connection": "x-drop-me",
        "x-drop-me": "1", "te": "trailers", "proxy-authorization": "Basic Zm9v"})
    echoed = json.loads(await response.content())
    assert echoed["query"] == "beta=true" and echoed["path"] == "/v1/messages"
    headers = echoed["headers"]
    assert headers["anthropic-beta"] == "tools-2024"
    assert headers["x-api-key"] == SECRET
    for dropped in ("x-drop-me", "te", "proxy-authorization"):
        assert dropped not in headers
    assert headers["accept-encoding"] == "identity"


@pytest_twisted.ensureDeferred
async def test_env_lane_replaces_client_credentials(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "model": "glm-4.6"}, {
        "x-fake-scenario": "echo", "authorization": f"Bearer {SECRET}"})
    echoed = json.loads(await response.content())
    assert echoed["path"] == "/api/anthropic/v1/messages"
    assert echoed["headers"]["x-api-key"] == ZAI_SECRET
    assert "authorization" not in echoed["headers"]
    [line] = ccpd.usage_lines()
    assert line["lane"] == "zai" and line["model"] == "glm-4.6"


@pytest_twisted.ensureDeferred
async def test_bearer_env_lane_sends_authorization(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), extra=(
        f"[lane:bearer]\nbase_url = {fake_upstream.url()}\nauth = bearer-env:ZAI_TEST_KEY\n"
        "[routing]\ndefault_lane = bearer\n"))
    response = await treq.get(ccpd.url + "/v1/models", headers={
        "x-fake-scenario": "echo", "x-api-key": SECRET})
    echoed = json.loads(await response.content())
    assert echoed["headers"]["authorization"] == f"Bearer {ZAI_SECRET}"
    assert "x-api-key" not in echoed["headers"]


@pytest_twisted.ensureDeferred
async def test_count_tokens_and_other_paths(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    counted = await post(ccpd.url + "/v1/messages/count_tokens", MESSAGE,
                         {"x-fake-input-tokens": "77"})
    assert json.loads(await counted.content()) == {"input_tokens": 77}
    models = await treq.get(ccpd.url + "/v1/models")
    assert models.code == 200
    assert json.loads(await models.content())["data"][0]["id"] == "fake-model"
    ops = [(line["op"], line["input_tokens"]) for line in ccpd.usage_lines()]
    assert ops == [("count_tokens", 0), ("passthrough", 0)]


@pytest_twisted.ensureDeferred
async def test_upstream_errors_pass_through_untouched(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    headers = {"x-fake-status": "429"}
    direct = await post(fake_upstream.url() + "/v1/messages", MESSAGE, headers)
    proxied = await post(ccpd.url + "/v1/messages", MESSAGE, headers)
    assert proxied.code == 429
    assert proxied.headers.getRawHeaders("retry-after") == ["30"]
    assert json.loads(await proxied.content()) == json.loads(await direct.content())
    [line] = ccpd.usage_lines()
    assert line["status"] == 429 and line["err_type"] == "rate_limit_error"
    assert [a["kind"] for a in ccpd.anomaly_lines()] == ["upstream_error"]


# -- ccpd's own errors -------------------------------------------------------------------------

async def error_of(response):
    body = json.loads(await response.content())
    assert body["type"] == "error"
    return response.code, body["error"]["type"]


@pytest_twisted.ensureDeferred
async def test_non_json_body_is_400(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    assert await error_of(await post(ccpd.url + "/v1/messages", b"{nope")) == \
        (400, "invalid_request_error")
    assert await error_of(await post(ccpd.url + "/v1/messages", b"[1, 2]")) == \
        (400, "invalid_request_error")
    assert fake_upstream.requests == []
    assert [(line["status"], line["err_type"], line["lane"]) for line in ccpd.usage_lines()] == \
        [(400, "invalid_request_error", "")] * 2


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    big = json.dumps({**MESSAGE, "pad": "x" * 70000}).encode()
    assert await error_of(await post(ccpd.url + "/v1/messages", big)) == \
        (413, "request_too_large")
    assert fake_upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_unreachable_lane_is_502(start_ccpd):
    ccpd = await start_ccpd(f"http://127.0.0.1:{free_port()}")
    response = await post(ccpd.url + "/v1/messages", MESSAGE)
    assert await error_of(response) == (502, "api_error")
    [line] = ccpd.usage_lines()
    assert line["status"] == 502 and line["err_type"] == "api_error"


@pytest_twisted.ensureDeferred
async def test_silent_lane_is_504(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())  # idle_timeout_s = 2 in the test config
    response = await post(ccpd.url + "/v1/messages", MESSAGE, {"x-fake-scenario": "hang"})
    assert await error_of(response) == (504, "timeout_error")
    await until(lambda: fake_upstream.cancelled == 1)


@pytest_twisted.ensureDeferred
async def test_missing_lane_key_is_502_naming_the_variable(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), environ={})
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "model": "glm-4.6"})
    body = json.loads(await response.content())
    assert response.code == 502 and "ZAI_TEST_KEY is not set" in body["error"]["message"]
    assert fake_upstream.requests == []


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
async def test_stream_gone_silent_ends_with_a_timeout_event(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "stream": True},
                          {"x-fake-scenario": "hang-after-headers"})
    body = await response.content()
    last = body.rstrip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\n")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "timeout_error"


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
async def test_stop_lets_requests_in_flight_finish_and_logs_them(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    reader = await open_stream(ccpd, {"x-fake-events": "20", "x-fake-interval-ms": "25"})
    await until(lambda: b"content_block_delta" in reader.data)
    await ccpd.service.stopService()
    await until(lambda: reader.done.called)
    assert reader.data.rstrip().endswith(b'data: {"type":"message_stop"}')
    [line] = ccpd.usage_lines()
    assert line["status"] == 200 and line["output_tokens"] == 20


@pytest_twisted.ensureDeferred
async def test_stop_cuts_off_endless_requests_after_the_grace_and_still_logs_them(
        fake_upstream, start_ccpd, monkeypatch):
    monkeypatch.setattr(tap, "STOP_GRACE_S", 0.3)
    ccpd = await start_ccpd(fake_upstream.url())
    reader = await open_stream(ccpd, {"x-fake-scenario": "hang-after-headers"})
    await until(lambda: b"message_start" in reader.data)
    await ccpd.service.stopService()
    [line] = ccpd.usage_lines()
    assert line["status"] == 499 and line["input_tokens"] == 12


# -- ops endpoints ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_healthz(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    response = await treq.get(ccpd.url + "/healthz")
    assert response.code == 200 and json.loads(await response.content()) == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_readyz_up_and_cached(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    first = await treq.get(ccpd.url + "/readyz")
    body = json.loads(await first.content())
    assert first.code == 200 and body["ready"] is True
    assert set(body["lanes"]) == {"anthropic", "zai"}
    probes = sum(1 for r in fake_upstream.requests if r.path.endswith("/v1/models"))
    assert probes == 2
    again = await treq.get(ccpd.url + "/readyz")
    assert again.code == 200
    assert sum(1 for r in fake_upstream.requests if r.path.endswith("/v1/models")) == probes
    metrics = (await (await treq.get(ccpd.url + "/metrics")).content()).decode()
    assert 'ccp_lane_up{lane="anthropic"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_readyz_names_the_failing_lane(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), zai_url=f"http://127.0.0.1:{free_port()}")
    response = await treq.get(ccpd.url + "/readyz")
    body = json.loads(await response.content())
    assert response.code == 503 and body["failing"] == ["zai"]
    assert body["lanes"]["anthropic"]["up"] is True
    metrics = (await (await treq.get(ccpd.url + "/metrics")).content()).decode()
    assert 'ccp_lane_up{lane="zai"} 0.0' in metrics


@pytest_twisted.ensureDeferred
async def test_readyz_counts_a_404_probe_as_up(fake_upstream, start_ccpd):
    # "Provider policy": any answer from 200 to 405 proves the lane is there.
    ccpd = await start_ccpd(fake_upstream.url(), extra="[lane:other]\nbase_url = "
                      f"{fake_upstream.url()}\nprobe_path = /v1/no-such-thing\n")
    response = await treq.get(ccpd.url + "/readyz")
    body = json.loads(await response.content())
    assert response.code == 200 and body["lanes"]["other"]["status"] == 404


@pytest_twisted.ensureDeferred
async def test_metrics_after_traffic(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    await (await post(ccpd.url + "/v1/messages", MESSAGE, {"x-fake-input-tokens": "5",
                                                           "x-fake-events": "3"})).content()
    response = await treq.get(ccpd.url + "/metrics")
    text = (await response.content()).decode()
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    assert ('ccp_requests_total{lane="anthropic",model="claude-sonnet-4-5",status="200"} 1.0'
            in text)
    assert 'ccp_tokens_total{kind="input",lane="anthropic",model="claude-sonnet-4-5"} 5.0' in text
    assert 'ccp_tokens_total{kind="output",lane="anthropic",model="claude-sonnet-4-5"} 3.0' in text
    assert "ccp_request_duration_seconds_bucket" in text and "ccp_ttft_seconds_count" in text


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_an_anthropic_shaped_404(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    assert await error_of(await treq.get(ccpd.url + "/nope")) == (404, "not_found_error")

"""The fake upstream the proxy tests and benchmarks rely on answers as documented."""
from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import pytest_twisted
import treq
from twisted.internet import error, reactor, task
from twisted.internet.threads import deferToThread

from ccpd.testing.fakeupstream import (HUGE_BLOCK_EVENTS, OVERLOADED_BODY, message_events,
                                       message_json)
from ccpd.usage import StreamAccountant, TokenUsage
# the raw loopback client and HTTP reader of the fault suite
from tests.test_faults import (USAGE, RawClient, connect, exchange, http_request, parse_responses,
                               port_of, read_to_end, until, wait_stalled)

BODY = json.dumps({"model": "m1", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


async def call(fake, path="/v1/messages", body=BODY, **headers):
    response = await treq.post(fake.url() + path, data=body, headers={
        "content-type": "application/json", **headers})
    return response, await response.content()


@pytest_twisted.ensureDeferred
async def test_json_and_stream_answers_report_the_asked_usage(fake_upstream):
    response, body = await call(fake_upstream, **{"x-fake-input-tokens": "3",
                                                  "x-fake-events": "4"})
    answer = json.loads(body)
    assert response.code == 200 and answer["model"] == "m1"
    assert answer["usage"]["input_tokens"] == 3 and answer["usage"]["output_tokens"] == 4

    stream_body = json.dumps({**json.loads(BODY), "stream": True}).encode()
    response, body = await call(fake_upstream, body=stream_body, **{"x-fake-cache-read": "9"})
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    accountant = StreamAccountant()
    accountant.feed(body)
    assert accountant.usage == TokenUsage(12, 5, 0, 9)
    assert fake_upstream.requests[-1].body == stream_body


@pytest_twisted.ensureDeferred
async def test_limit_answers(fake_upstream):
    response, body = await call(fake_upstream, **{"x-fake-status": "429"})
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["30"]
    assert response.headers.getRawHeaders("anthropic-ratelimit-tokens-reset")
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    for scenario, code in (("zai-1308", "1308"), ("zai-1310", "1310")):
        response, body = await call(fake_upstream, **{"x-fake-scenario": scenario})
        error = json.loads(body)["error"]
        assert response.code == 429 and error["code"] == code
        assert "Your limit will reset at " in error["message"]


@pytest_twisted.ensureDeferred
async def test_usage_headers_count_tokens_models_and_unknown_paths(fake_upstream):
    response, body = await call(fake_upstream, **{"x-fake-scenario": "usage-headers",
                                                  "x-fake-events": "2"})
    assert "usage" not in json.loads(body)
    assert response.headers.getRawHeaders("x-usage-output-tokens") == ["2"]
    _, body = await call(fake_upstream, "/api/anthropic/v1/messages/count_tokens")
    assert json.loads(body) == {"input_tokens": 12}
    models = await treq.get(fake_upstream.url() + "/v1/models")
    assert json.loads(await models.content())["data"][0]["id"] == "fake-model"
    response, _ = await call(fake_upstream, "/v2/else")
    assert response.code == 404


def test_runs_as_a_program_and_reports_its_port(tmp_path):
    port_file = tmp_path / "port"
    child = subprocess.Popen([sys.executable, "-m", "ccpd.testing.fakeupstream", "--port", "0",
                              "--port-file", str(port_file), "--no-record"])
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        port = int(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
            assert json.loads(answer.read())["data"][0]["id"] == "fake-model"
    finally:
        child.terminate()
        child.wait(timeout=10)


# -- fault scenarios ----------------------------------------------------------------------------

def _port(fake) -> int:
    return port_of(fake.url())


def _message(model: str, stream: bool) -> dict:
    return {"model": model, "max_tokens": 8, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}


async def _exchange(fake, model, stream, **headers):
    data, _ = await exchange(_port(fake), http_request(_port(fake), _message(model, stream),
                                                       headers))
    [response] = parse_responses(data)
    return response


@pytest_twisted.ensureDeferred
async def test_overloaded_answers_are_shaped_like_anthropics(fake_upstream):
    response = await _exchange(fake_upstream, "m1", False, **{"x-fake-scenario": "overloaded"})
    assert (response.status, response.body) == (529, OVERLOADED_BODY)
    assert json.loads(response.body)["error"] == {"type": "overloaded_error",
                                                  "message": "Overloaded"}
    assert response.headers["x-should-retry"] == "true"
    assert response.headers["request-id"] == json.loads(response.body)["request_id"]
    assert response.headers["content-type"] == "application/json"

    fake_upstream.overloaded = True  # a storm: streams are refused before they start too
    response = await _exchange(fake_upstream, "m1", True)
    assert (response.status, response.body) == (529, OVERLOADED_BODY)
    fake_upstream.overloaded = False

    response = await _exchange(fake_upstream, "m1", True,
                               **{"x-fake-scenario": "overloaded-mid-stream"})
    accountant = StreamAccountant()
    accountant.feed(response.body)
    assert response.status == 200 and response.complete
    assert accountant.error_type == "overloaded_error" and accountant.usage.input_tokens == 12
    assert response.body.endswith(b"event: error\ndata: " + OVERLOADED_BODY + b"\n\n")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_stalls_hold_the_connection_open(fake_upstream, stream):
    port = _port(fake_upstream)
    before = await connect(port, RawClient(http_request(
        port, _message("m1", stream), {"x-fake-scenario": "stall-before-headers"})))
    mid = await connect(port, RawClient(http_request(
        port, _message("m2", stream), {"x-fake-scenario": "stall-mid-body"})))
    await until(lambda: fake_upstream.in_flight == 2 and mid.data)
    await task.deferLater(reactor, 0.2, lambda: None)
    assert before.data == b"" and not before.closed.called and not mid.closed.called
    [response] = parse_responses(bytes(mid.data))
    assert response.status == 200 and not response.complete
    if stream:
        assert response.body == b"".join(message_events("m2", USAGE, 5)[:5])
    else:
        whole = json.dumps(message_json("m2", dict(USAGE), 5), separators=(",", ":")).encode()
        assert int(response.headers["content-length"]) == len(whole)
        assert response.body == whole[:len(whole) // 2]
    before.abort()
    mid.abort()
    await until(lambda: fake_upstream.in_flight == 0)
    assert [r.outcome for r in fake_upstream.requests] == ["cancelled", "cancelled"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_reset_mid_stream_is_a_tcp_reset(fake_upstream, stream):
    port = _port(fake_upstream)
    client = await connect(port, RawClient(http_request(
        port, _message("m1", stream), {"x-fake-scenario": "reset-mid-stream"})))
    data = await client.closed
    assert client.reason.check(error.ConnectionLost)  # a reset, not a clean close
    assert not client.reason.check(error.ConnectionDone)
    [response] = parse_responses(data)
    assert not response.complete
    if stream:
        assert response.body == b"".join(message_events("m1", USAGE, 5)[:5])
    await until(lambda: fake_upstream.in_flight == 0)


@pytest.mark.parametrize("scenario", ["malformed-sse", "non-utf8-sse"])
@pytest_twisted.ensureDeferred
async def test_odd_streams_keep_the_usual_usage(fake_upstream, scenario):
    response = await _exchange(fake_upstream, "m1", True, **{"x-fake-scenario": scenario})
    assert response.status == 200 and response.complete
    accountant = StreamAccountant()
    accountant.feed(response.body)
    assert accountant.usage == TokenUsage(12, 5, 0, 0) and accountant.served_model == "m1"
    if scenario == "malformed-sse":
        assert b"\r\n" in response.body and b"\rdata:" in response.body
        assert accountant.anomaly.startswith("message_delta event is not JSON")
    else:
        with pytest.raises(UnicodeDecodeError):
            response.body.decode("utf-8")
        assert "grin \U0001F600".encode() in response.body  # whole once the pieces are joined


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_gzip_bodies_decompress_to_the_usual_answer(fake_upstream, stream):
    response = await _exchange(fake_upstream, "m1", stream, **{"x-fake-scenario": "gzip"})
    plain = await _exchange(fake_upstream, "m1", stream)
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(response.body) == plain.body
    again = await _exchange(fake_upstream, "m1", stream, **{"x-fake-scenario": "gzip"})
    assert again.body == response.body  # deterministic (mtime 0)


@pytest_twisted.ensureDeferred
async def test_huge_stream_waits_for_a_client_that_does_not_read(fake_upstream):
    size = 24 * 1024 * 1024
    port = _port(fake_upstream)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(http_request(port, _message("m1", True),
                              {"x-fake-scenario": "huge-stream", "x-fake-bytes": str(size)}))
    # the producer is paused by the full connection: far less than the stream was handed over
    stalled = await wait_stalled(fake_upstream, quiet=0.3)
    assert stalled < size / 2
    data = await deferToThread(read_to_end, sock)
    [response] = parse_responses(data)
    assert response.complete and len(response.body) == fake_upstream.streamed_bytes >= size
    accountant = StreamAccountant()
    accountant.feed(response.body)
    deltas = response.body.count(b"event: content_block_delta")
    assert deltas % HUGE_BLOCK_EVENTS == 0
    assert accountant.usage == TokenUsage(12, deltas, 0, 0)
    assert response.body.endswith(b'data: {"type":"message_stop"}\n\n')


@pytest_twisted.ensureDeferred
async def test_endless_line_is_one_data_line_of_the_size_asked(fake_upstream):
    size = 1024 * 1024
    response = await _exchange(fake_upstream, "m1", True, **{
        "x-fake-scenario": "endless-line", "x-fake-bytes": str(size)})
    longest = max(response.body.split(b"\n"), key=len)
    assert longest.startswith(b'data: {"x":"xxx') and len(longest) >= size
    accountant = StreamAccountant()
    accountant.feed(response.body)
    assert accountant.usage == TokenUsage(12, 5, 0, 0)


@pytest_twisted.ensureDeferred
async def test_gate_holds_answers_and_connections_can_be_dropped(fake_upstream):
    port = _port(fake_upstream)
    clients = [await connect(port, RawClient(http_request(
        port, _message(f"m{i}", True), {"x-fake-scenario": "gate"}))) for i in range(3)]
    await until(lambda: fake_upstream.in_flight == 3)
    await task.deferLater(reactor, 0.1, lambda: None)
    assert all(not client.data for client in clients)
    assert fake_upstream.open_gate() == 3 and fake_upstream.peak_in_flight == 3
    for client in clients:
        [response] = parse_responses(await client.closed)
        assert response.complete and response.body.endswith(b'{"type":"message_stop"}\n\n')
    assert [r.outcome for r in fake_upstream.requests] == ["finished"] * 3

    # a kept-alive connection, then dropped by the fake
    idle = await connect(port, RawClient(http_request(port, _message("m9", False),
                                                      close=False)))
    await until(lambda: parse_responses(bytes(idle.data)))
    assert fake_upstream.open_connections() == 1 and not idle.closed.called
    assert fake_upstream.drop_connections() == 1
    await idle.closed
    assert fake_upstream.open_connections() == 0

"""The fake upstream the proxy tests and benchmarks rely on answers as documented."""
from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import error, reactor, task
from twisted.internet.threads import deferToThread

from ccpd.config import utc_offset
from ccpd.limits import classify, read_utilization
from ccpd.testing.fakeupstream import (HUGE_BLOCK_EVENTS, OVERLOADED_BODY, QUOTA_PATH,
                                       FakeUpstream, message_events, message_json)
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


# -- provider limits, held to fixtures/limits/answers.json --------------------------------------
#
# In memory: the fake under StubTreq, its clock a task.Clock set to the fixtures' "now".

FIXTURES = Path(__file__).parent.parent / "fixtures"
LIMITS = json.loads((FIXTURES / "limits" / "answers.json").read_text(encoding="utf-8"))
ROWS = {row["name"]: row for row in LIMITS["answers"]}
NOW = LIMITS["now"]
QUOTA = json.loads((FIXTURES / "zai" / "quota_limit.json").read_text(encoding="utf-8"))
UNIFIED = "anthropic-ratelimit-unified-"
WIRE_HEADERS = {"content-length", "date", "server"}  # what twisted.web adds to any answer
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}).encode()


class Answer:
    """One whole answer of the in-memory fake, headers by lower-case name."""

    def __init__(self, code: int, headers: dict[str, str], body: bytes):
        self.code, self.headers, self.body = code, headers, body

    def json(self):
        return json.loads(self.body)


def in_memory(now: float = NOW) -> tuple[FakeUpstream, StubTreq]:
    clock = task.Clock()
    clock.advance(now)
    fake = FakeUpstream(clock)
    return fake, StubTreq(fake)


def _result(stub: StubTreq, d):
    stub.flush()
    results = []
    d.addBoth(results.append)
    assert results, "the fake has not answered"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def send(stub: StubTreq, method="POST", path="/v1/messages", body=BODY, **headers) -> Answer:
    response = _result(stub, stub.request(method, "http://fake.test" + path, data=body,
                                          headers={"content-type": "application/json",
                                                   **headers}))
    headers = {name.decode().lower(): values[-1].decode()
               for name, values in response.headers.getAllRawHeaders()}
    if headers.get("content-encoding") == "":
        del headers["content-encoding"]  # left by treq's gzip decoder, not sent by the fake
    return Answer(response.code, headers, _result(stub, response.content()))


def classified(row, answer: Answer, now: float = NOW):
    return classify(answer.code, answer.headers, answer.body, now,
                    utc_offset(row["lane_reset_tz"]), owns_credentials=row["owns_credentials"])


def assert_classified_as_expected(row, got, shift: float = 0.0):
    expected = row["expected"]
    assert (got.kind, got.window, got.reset_source, got.code) == (
        expected["kind"], expected["window"], expected["reset_source"], expected["code"])
    if expected["reset_at"] is None:
        assert got.reset_at is None
    else:
        assert got.reset_at == pytest.approx(expected["reset_at"] + shift)


@pytest.mark.parametrize("row", LIMITS["answers"], ids=lambda row: row["name"])
def test_every_limit_fixture_is_answered_as_recorded_and_classified_alike(row):
    _, stub = in_memory()
    answer = send(stub, **{"x-fake-scenario": f"limit:{row['name']}"})
    recorded = row["answer"]
    assert answer.code == recorded["status"]
    assert {name: answer.headers.get(name) for name in recorded["headers"]} == recorded["headers"]
    assert set(answer.headers) - set(recorded["headers"]) <= WIRE_HEADERS
    assert answer.json() == recorded["body"]
    assert_classified_as_expected(row, classified(row, answer))
    if "utilization" in row["expected"]:
        seen, want = read_utilization(answer.headers), row["expected"]["utilization"]
        assert (seen.status, seen.reset_at, seen.representative_claim) == (
            want["status"], want["reset_at"], want["representative_claim"])
        assert [seen.windows["five_hour"].utilization,
                seen.windows["seven_day"].utilization] == [want["five_hour"][0],
                                                           want["seven_day"][0]]


@pytest.mark.parametrize("row", LIMITS["answers"], ids=lambda row: row["name"])
def test_relative_limit_times_lift_as_far_ahead_of_the_fakes_clock(row):
    later = 3 * 86400 + 17  # the fake's clock is three days and 17 s past the fixtures' now
    fake, stub = in_memory(NOW + later)
    fake.relative_limit_times = True
    fake.limit_answer = row["name"]
    answer = send(stub)
    assert answer.code == row["answer"]["status"]
    assert_classified_as_expected(row, classified(row, answer, NOW + later), shift=later)


def test_limit_answer_answers_every_messages_request_until_it_is_unset():
    fake, stub = in_memory()
    fake.limit_answer = "zai_1302_concurrency"
    recorded = ROWS["zai_1302_concurrency"]["answer"]
    for body in (BODY, STREAM_BODY):
        answer = send(stub, body=body)
        assert (answer.code, answer.json()) == (429, recorded["body"])
        assert answer.headers["retry-after-ms"] == "1500"
    # only Messages requests: token counting and the model list go on
    assert send(stub, path="/v1/messages/count_tokens").json() == {"input_tokens": 12}
    assert send(stub, "GET", "/v1/models", body=None).code == 200
    fake.limit_answer = None
    assert send(stub).code == 200


def test_limit_answer_goes_first_and_leaves_limit_tokens_alone():
    clock = task.Clock()
    clock.advance(NOW)
    fake = FakeUpstream(clock, limit_tokens=0, limit_code="1310")
    stub = StubTreq(fake)
    fake.limit_answer = "anthropic_overloaded_529"
    assert send(stub).code == 529
    fake.limit_answer = None
    answer = send(stub)
    assert (answer.code, answer.json()["error"]["code"]) == (429, "1310")


def test_an_unknown_limit_fixture_is_a_400_that_names_it():
    _, stub = in_memory()
    answer = send(stub, **{"x-fake-scenario": "limit:zai_9999_nonsense"})
    assert answer.code == 400 and "zai_9999_nonsense" in answer.json()["error"]["message"]


@pytest.mark.parametrize("body", [BODY, STREAM_BODY], ids=["json", "sse"])
def test_unified_headers_on_ordinary_answers_read_back_as_utilization(body):
    _, stub = in_memory(NOW + 0.4)
    answer = send(stub, body=body,
                  **{"x-fake-unified": "5h=0.85,7d=0.30,status=allowed_warning"})
    assert answer.code == 200
    seen = read_utilization(answer.headers)
    assert (seen.status, seen.representative_claim) == ("allowed_warning", "five_hour")
    five_hour, seven_day = seen.windows["five_hour"], seen.windows["seven_day"]
    assert (five_hour.utilization, five_hour.status, five_hour.reset_at) == (
        0.85, "allowed_warning", NOW + 3600)
    assert (seven_day.utilization, seven_day.status, seven_day.reset_at) == (
        0.30, "allowed", NOW + 5 * 86400)
    assert seen.reset_at == NOW + 3600  # the claimed window's
    assert classified(ROWS["anthropic_200_with_utilization"], answer).kind is None
    if body is STREAM_BODY:
        accountant = StreamAccountant()
        accountant.feed(answer.body)
        assert accountant.usage == TokenUsage(12, 5, 0, 0)
    else:
        assert answer.json()["usage"]["output_tokens"] == 5


def test_unified_headers_are_named_and_valued_as_anthropic_sends_them():
    _, stub = in_memory()
    answer = send(stub, **{"x-fake-unified": "5h=0.85,7d=0.41,status=allowed_warning,"
                                             "claim=five_hour,5h-reset=1796203600,"
                                             "7d-reset=1796630400"})
    recorded = ROWS["anthropic_200_with_utilization"]["answer"]["headers"]
    sent = {name: value for name, value in answer.headers.items() if name.startswith(UNIFIED)}
    want = {name: value for name, value in recorded.items() if name.startswith(UNIFIED)
            and not name.endswith("-surpassed-threshold")}  # a header the fake does not send
    assert sent == want


@pytest.mark.parametrize("claim", ["five_hour", "seven_day"])
def test_unified_rejected_is_anthropics_429_for_the_claimed_window(claim):
    row = ROWS[f"anthropic_unified_rejected_{claim}"]
    headers = row["answer"]["headers"]
    spec = ",".join([f"status=rejected,claim={claim}"] + [
        f"{short}={headers[f'{UNIFIED}{short}-utilization']},"
        f"{short}-reset={headers[f'{UNIFIED}{short}-reset']}" for short in ("5h", "7d")])
    _, stub = in_memory()
    answer = send(stub, body=STREAM_BODY, **{"x-fake-unified": spec})
    assert (answer.code, answer.json()) == (429, row["answer"]["body"])
    assert {name: value for name, value in answer.headers.items()
            if name not in WIRE_HEADERS} == headers
    assert_classified_as_expected(row, classified(row, answer))


def test_rejected_without_figures_uses_the_clock_and_a_full_window():
    _, stub = in_memory()
    answer = send(stub, **{"x-fake-unified": "status=rejected,claim=seven_day"})
    assert answer.code == 429
    assert answer.headers[UNIFIED + "7d-utilization"] == "1.0"
    assert answer.headers["retry-after"] == str(5 * 86400)
    got = classified(ROWS["anthropic_unified_rejected_seven_day"], answer)
    assert (got.kind, got.window, got.reset_at) == ("window_exhausted", "seven_day",
                                                    NOW + 5 * 86400)


def test_fake_unified_marks_every_answer_and_a_header_overrides_it():
    fake, stub = in_memory()
    fake.unified = {"5h": 0.5, "7d": 0.25}
    for body in (BODY, STREAM_BODY):
        seen = read_utilization(send(stub, body=body).headers)
        assert (seen.windows["five_hour"].utilization, seen.windows["seven_day"].utilization,
                seen.status) == (0.5, 0.25, "allowed")
    seen = read_utilization(send(stub, **{"x-fake-unified": "7d=0.9"}).headers)
    assert (seen.windows["seven_day"].utilization, seen.representative_claim) == (
        0.9, "seven_day")
    fake.unified = {"status": "rejected", "claim": "five_hour"}
    assert send(stub).code == 429
    fake.unified = None
    answer = send(stub)
    assert answer.code == 200 and read_utilization(answer.headers) is None


@pytest.mark.parametrize("spec", ["5h=lots", "6h=0.5", "status"])
def test_a_bad_unified_spec_is_a_400(spec):
    _, stub = in_memory()
    answer = send(stub, **{"x-fake-unified": spec})
    assert answer.code == 400 and "x-fake-unified" in answer.json()["error"]["message"]


# -- Z.AI's quota endpoint ------------------------------------------------------------------------

def test_quota_endpoint_answers_the_fixture_with_the_fakes_figures_and_clock():
    fake, stub = in_memory()
    fake.quota = {"five_hour": 55, "weekly": 7.5}
    answer = send(stub, "GET", QUOTA_PATH, body=None, authorization="Bearer k")
    assert answer.code == 200 and answer.headers["content-type"] == "application/json"
    limits = answer.json()["data"]["limits"]
    assert [(limit["type"], limit["unit"], limit["percentage"], limit["nextResetTime"])
            for limit in limits] == [
        ("TIME_LIMIT", 5, 3, QUOTA["data"]["limits"][0]["nextResetTime"]),
        ("TOKENS_LIMIT", 3, 55, (NOW + 3600) * 1000),
        ("TOKENS_LIMIT", 6, 7.5, (NOW + 5 * 86400) * 1000)]
    # everything else is the fixture's
    shape = json.loads(json.dumps(QUOTA))
    for recorded, got in zip(shape["data"]["limits"], limits):
        recorded.update(percentage=got["percentage"], nextResetTime=got["nextResetTime"])
    assert answer.json() == shape
    assert (fake.requests[-1].method, fake.requests[-1].path,
            fake.requests[-1].headers["authorization"]) == ("GET", QUOTA_PATH, "Bearer k")
    # only at the host root, as Z.AI serves it
    assert send(stub, "GET", "/api/anthropic" + QUOTA_PATH, body=None).code == 404


@pytest.mark.parametrize("mode, code, business_code", [
    ("error", 500, 500), ("not-json", 200, None), ("no-limits", 200, 200),
    ("unauthorized", 401, 1001), ("expired", 200, 401), ("bogus", 400, 400)])
def test_quota_modes(mode, code, business_code):
    fake, stub = in_memory()
    fake.quota_mode = mode
    answer = send(stub, "GET", QUOTA_PATH, body=None)
    assert answer.code == code
    if business_code is None:
        with pytest.raises(ValueError):
            answer.json()
    else:
        assert answer.json()["code"] == business_code
        assert not (answer.json().get("data") or {}).get("limits")


def test_quota_hang_never_answers():
    fake, stub = in_memory()
    fake.quota_mode = "hang"
    answers = []
    d = stub.get("http://fake.test" + QUOTA_PATH).addBoth(answers.append)
    stub.flush()
    fake.reactor.advance(3600)
    stub.flush()
    assert answers == [] and fake.in_flight == 1
    d.cancel()
    stub.flush()
    assert fake.in_flight == 0 and fake.requests[-1].outcome == "cancelled"


@pytest.mark.parametrize("scenario, kind, window, after", [
    ("zai-1308", "window_exhausted", "five_hour", 1800),
    ("zai-1310", "window_exhausted", "weekly", 1800),
    ("rate-limit", "burst", None, 30),
])
def test_the_fakes_own_limit_answers_are_dated_by_its_clock(scenario, kind, window, after):
    _, stub = in_memory(NOW + 7)
    headers = ({"x-fake-status": "429"} if scenario == "rate-limit"
               else {"x-fake-scenario": scenario})
    answer = send(stub, **headers)
    got = classify(answer.code, answer.headers, answer.body, NOW + 7, utc_offset("+08:00"))
    assert (got.kind, got.window, got.reset_at) == (kind, window, NOW + 7 + after)

"""Connection hygiene and overload: header deadline, oversized headers, listen backlog and
``max_in_flight``.

The channel is driven in memory (a ``StringTransport`` and a ``MemoryReactorClock``) where the
logic is the point; real sockets where the kernel is (the 431 reaching a client that is still
sending, the backlog of the listening socket, requests held open by a real upstream).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from ccpd.metrics import Metrics
from ccpd.tap import with_backlog
from ccpd.web.site import LINGER_SECONDS, MAX_HEADER_BYTES, CcpdSite

MESSAGE = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


class _Hello(Resource):
    isLeaf = True

    def render(self, request):
        return b"hello"


def connect(header_timeout: float = 5.0):
    clock = MemoryReactorClock()
    metrics = Metrics()
    site = CcpdSite(_Hello(), 1024, header_timeout, metrics.refused, reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock, metrics


def refused(metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("ccp_requests_refused_total", {"reason": reason})


def test_a_client_trickling_its_headers_is_dropped_at_the_deadline():
    channel, transport, clock, metrics = connect(header_timeout=5)
    channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for _ in range(9):  # a byte every half second never extends the deadline
        clock.advance(0.5)
        channel.dataReceived(b"x")
    assert not transport.disconnected
    clock.advance(0.6)
    assert transport.disconnected
    assert transport.value() == b""
    assert refused(metrics, "header_timeout") == 1


def test_a_silent_connection_is_dropped_at_the_deadline():
    _channel, transport, clock, metrics = connect(header_timeout=5)
    clock.advance(4.9)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected and refused(metrics, "header_timeout") == 1


def test_the_deadline_covers_headers_only_and_restarts_for_the_next_request():
    channel, transport, clock, metrics = connect(header_timeout=5)
    clock.advance(4)
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ") and transport.value().endswith(
        b"hello")
    clock.advance(60)  # an idle keep-alive connection is not a slow client
    assert not transport.disconnected
    channel.dataReceived(b"GET /b HTTP/1.1\r\n")  # the next request has its own deadline
    clock.advance(5.1)
    assert transport.disconnected and refused(metrics, "header_timeout") == 1


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n",           # one line too long
    b"".join(b"X-H%d: %s\r\n" % (n, b"b" * 1000) for n in range(40)),  # too many in all
])
def test_oversized_headers_get_431_in_anthropics_shape(headers):
    channel, transport, clock, metrics = connect()
    channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers)
    channel.dataReceived(b"\r\nmore bytes the client was still sending\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head
    assert json.loads(body) == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": f"request headers exceed {MAX_HEADER_BYTES} bytes"}}
    # open a little longer, draining what the client still sends, then closed
    assert not transport.disconnecting
    clock.advance(LINGER_SECONDS)
    assert transport.disconnecting
    assert refused(metrics, "headers_too_large") == 1


def test_headers_just_under_the_limit_are_served():
    channel, transport, _clock, _metrics = connect()
    filler = b"X-Fill: " + b"f" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + filler + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read one answer (head and content-length body), as a client would."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
        return received


@pytest_twisted.ensureDeferred
async def test_a_200_kb_header_gets_its_431_over_a_real_socket(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url())
    port = int(ccpd.url.rsplit(":", 1)[1])
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
               + b"z" * 200_000 + b"\r\ncontent-length: 2\r\n\r\n{}")
    received = await deferToThread(_raw_exchange, port, request)
    assert received.startswith(b"HTTP/1.1 431 ")
    assert json.loads(received.partition(b"\r\n\r\n")[2])["error"]["type"] == \
        "invalid_request_error"
    assert fake_upstream.requests == []


def test_backlog_is_added_to_stream_endpoints_only():
    assert with_backlog("tcp:8787:interface=127.0.0.1", 511) == \
        "tcp:8787:interface=127.0.0.1:backlog=511"
    assert with_backlog("unix:/run/ccpd.sock", 64) == "unix:/run/ccpd.sock:backlog=64"
    assert with_backlog("systemd:domain=INET:index=0", 511) == "systemd:domain=INET:index=0"


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (Debian iproute2) is not installed")
@pytest_twisted.ensureDeferred
async def test_the_listening_socket_has_the_configured_backlog(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), server_extra="backlog = 777")
    port = ccpd.url.rsplit(":", 1)[1]
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, check=True).stdout
    # For a listening socket, ss shows the backlog as Send-Q (capped by net.core.somaxconn).
    with open("/proc/sys/net/core/somaxconn") as f:
        expected = min(777, int(f.read()))
    assert listing.split()[2] == str(expected), listing


@pytest_twisted.ensureDeferred
async def test_past_max_in_flight_requests_get_529_with_retry_after(fake_upstream, start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), server_extra="max_in_flight = 2")
    headers = {"content-type": "application/json", "x-api-key": "sk-test",
               "x-fake-first-byte-ms": "400"}
    body = json.dumps(MESSAGE).encode()
    held = [treq.post(ccpd.url + "/v1/messages", body, headers=headers) for _ in range(2)]
    for _ in range(300):  # until both are held at the upstream (3 s at most)
        if fake_upstream.in_flight == 2:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    shed = await treq.post(ccpd.url + "/v1/messages", body, headers=headers)
    assert shed.code == 529
    assert shed.headers.getRawHeaders("retry-after") == ["1"]
    assert json.loads(await shed.content())["error"]["type"] == "overloaded_error"
    assert [r.code for r in await defer.gatherResults(held)] == [200, 200]
    after = await treq.post(ccpd.url + "/v1/messages", body, headers=headers)
    assert after.code == 200  # the bound frees up as requests end
    assert sorted(line["status"] for line in ccpd.usage_lines()) == [200, 200, 200, 529]
    metrics = ccpd.service.app.metrics
    assert refused(metrics, "overloaded") == 1
    assert len(fake_upstream.requests) == 3

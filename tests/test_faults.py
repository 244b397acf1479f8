"""Fault injection: ccpd as users run it (``twistd -n ccpd`` in its own process), the fake
upstream of :mod:`ccpd.testing.fakeupstream` in this process, and real loopback clients, driven
through what goes wrong in front of and behind a gateway.

Each case asserts what a user would notice — the bytes and status codes the client got, the
lines in ``usage.jsonl``, the rows in the SQLite store, the requests the upstream saw — and the
resources of the ccpd process (RSS and open descriptors from ``/proc``). The figures measured on
the way are written to ``results/fault_figures.json`` for docs/RELIABILITY.md; none of them is a
pass/fail threshold except the resource bounds.
"""
from __future__ import annotations

import gzip
import json
import os
import platform
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread

from ccpd.testing.fakeupstream import (OVERLOADED_BODY, FakeUpstream, message_events,
                                       message_json)
# (through tests.conftest and tests.test_proxy, where these helpers are found with or without
# tests/support.py)
from tests.conftest import ccpd_ini
from tests.test_proxy import MESSAGE, SECRET, free_port, until
from tests.test_smoke import TWISTD

ROOT = Path(__file__).resolve().parent.parent
FIGURES_FILE = ROOT / "results" / "fault_figures.json"
MiB = 1024 * 1024
USAGE = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

# The 1000-connection case needs more than the defaults (backlog 511, max_in_flight 512).
OVERLOAD_KEYS = "backlog = 1024\nmax_in_flight = 2000"


# -- figures ------------------------------------------------------------------------------------

FIGURES: dict[str, dict] = {}


def record(case: str, **figures) -> None:
    """Keep figures of ``case`` for results/fault_figures.json."""
    FIGURES.setdefault(case, {}).update(figures)


def _machine() -> dict:
    def run(*command: str) -> str:
        try:
            return subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except OSError:
            return ""

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    return {"commit": run("git", "rev-parse", "--short", "HEAD") or "unknown",
            "nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release()}


@pytest.fixture(scope="module", autouse=True)
def fault_figures():
    """Writes the figures of this run at the end of the module; cases not run this time keep
    the figures of the run that last measured them (each case says which run that was)."""
    started = time.monotonic()
    yield FIGURES
    try:
        with open(FIGURES_FILE, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = {}
    run = {**_machine(), "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": ".venv/bin/python -m pytest tests/test_faults.py -q",
           "module_wall_s": round(time.monotonic() - started, 2)}
    cases = dict(previous.get("cases", {}))
    for case, figures in FIGURES.items():
        cases[case] = {**figures, "run": run["at"], "commit": run["commit"]}
    FIGURES_FILE.parent.mkdir(exist_ok=True)
    with open(FIGURES_FILE, "w", encoding="utf-8") as f:
        json.dump({"last_run": run, "cases": dict(sorted(cases.items()))}, f, indent=1,
                  sort_keys=False)
        f.write("\n")


# -- ccpd in its own process --------------------------------------------------------------------

def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _proc_tcp() -> dict[str, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket of this network."""
    sockets = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                    sockets[inode] = (int(local.rsplit(":", 1)[1], 16),
                                      int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            pass
    return sockets


class CcpdProcess:
    """ccpd started as ``twistd -n --pidfile= ccpd --config FILE``, and what /proc says of it."""

    def __init__(self, directory: Path, upstream_url: str, idle_timeout_s: float = 2,
                 server_extra: str = ""):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream_port = port_of(upstream_url)
        self.logs = directory / "logs"
        self.db = self.logs / "ccp.sqlite3"
        self.output = directory / "twistd.out"
        self.config = directory / "ccp.ini"
        self.config.write_text(
            ccpd_ini(directory, upstream_url, server_extra=server_extra)
            .replace("listen = tcp:0:", f"listen = tcp:{self.port}:")
            # no periodic readiness probe (only the one at start) in a socket count
            .replace("idle_timeout_s = 2\n",
                     f"idle_timeout_s = {idle_timeout_s:g}\nprobe_interval = 1h\n"))
        self.child: subprocess.Popen | None = None

    async def start(self) -> float:
        """Start and wait until /healthz answers; the seconds that took."""
        started = time.monotonic()
        with open(self.output, "ab") as out:
            self.child = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "ccpd", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.directory, env=self._environ())
        for _ in range(300):  # 15 s at most
            assert self.child.poll() is None, self.output.read_text()
            try:
                data, _ = await exchange(self.port, http_get(self.port, "/healthz"), timeout=2)
                if data.startswith(b"HTTP/1.1 200 "):
                    return time.monotonic() - started
            except ConnectError:
                pass  # not listening yet
            await sleep(0.05)
        raise AssertionError("ccpd did not become healthy")

    @staticmethod
    def _environ() -> dict[str, str]:
        """This environment without ``CCP_*`` overrides (they would override the test config)."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CCP_")}
        return {**environ, "ZAI_TEST_KEY": "zai-key"}

    @property
    def pid(self) -> int:
        return self.child.pid

    def _status_kb(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def rss_mb(self) -> float:
        return round(self._status_kb("VmRSS") / 1024, 1)

    def peak_rss_mb(self) -> float:
        """The high-water mark of the resident set since the process started."""
        return round(self._status_kb("VmHWM") / 1024, 1)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def _tcp_sockets(self) -> list[tuple[int, int, str]]:
        """(local port, remote port, state) of each TCP socket ccpd holds."""
        tcp = _proc_tcp()
        found = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:[") and target[8:-1] in tcp:
                found.append(tcp[target[8:-1]])
        return found

    def sockets(self) -> Counter:
        """ccpd's TCP sockets by kind: listen, client (accepted), upstream, other."""
        kinds: Counter = Counter()
        for local, remote, state in self._tcp_sockets():
            if state == "0A":
                kinds["listen"] += 1
            elif local == self.port:
                kinds["client"] += 1
            elif remote == self.upstream_port:
                kinds["upstream"] += 1
            else:
                kinds["other"] += 1
        return kinds

    def client_ports(self) -> set[int]:
        """The client-side ports of the connections ccpd holds open."""
        return {remote for local, remote, state in self._tcp_sockets()
                if local == self.port and state != "0A"}

    def usage_lines(self) -> list[dict]:
        return _read_jsonl(self.logs / "usage.jsonl")

    def anomaly_lines(self) -> list[dict]:
        return _read_jsonl(self.logs / "anomaly.jsonl")

    def lines_for(self, model: str) -> list[dict]:
        return [line for line in self.usage_lines() if line["model"] == model]

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.child.send_signal(sig)
        return await deferToThread(self.child.wait, timeout)

    def kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait(10)


def _read_jsonl(path: Path) -> list[dict]:
    """Every line (strict: a line that is not JSON fails the test)."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def spawn_ccpd(tmp_path):
    """``spawn_ccpd(upstream_url, ...)``: a CcpdProcess (not started), killed after the test."""
    made: list[CcpdProcess] = []

    def spawn(upstream_url: str, **options) -> CcpdProcess:
        directory = tmp_path / f"ccpd{len(made)}"
        directory.mkdir()
        made.append(CcpdProcess(directory, upstream_url, **options))
        return made[-1]

    yield spawn
    for ccpd in made:
        ccpd.kill()


@dataclass
class Shared:
    fake: FakeUpstream
    ccpd: CcpdProcess


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One fake and one ccpd for the cases that need no process of their own (each uses its
    own model names, so its lines and upstream requests are its own)."""
    fake = FakeUpstream(reactor)
    port = fake.listen(0)
    ccpd = CcpdProcess(tmp_path_factory.mktemp("shared"), fake.url(), idle_timeout_s=0.5)
    pytest_twisted.blockon(defer.ensureDeferred(ccpd.start()))
    yield Shared(fake, ccpd)
    ccpd.kill()
    pytest_twisted.blockon(port.stopListening())


def seen(fake: FakeUpstream, model: str) -> list:
    """The requests for ``model`` the fake upstream received."""
    found = []
    for request in fake.requests:
        try:
            if json.loads(request.body).get("model") == model:
                found.append(request)
        except (ValueError, AttributeError):
            pass
    return found


async def settle_fds(ccpd: CcpdProcess, fake: FakeUpstream, timeout: float = 10) -> int:
    """Wait until nothing is in flight, close the fake's idle connections (ccpd's pooled sockets
    go with them) and wait until ccpd holds no client or upstream socket; its fd count then."""
    await until(lambda: fake.in_flight == 0, timeout)
    fake.drop_connections()

    def released() -> bool:
        sockets = ccpd.sockets()
        return not (sockets["client"] or sockets["upstream"])

    assert await within(timeout, released), f"ccpd still holds sockets: {dict(ccpd.sockets())}"
    return ccpd.fds()


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def within(seconds: float, predicate) -> bool:
    """Whether ``predicate()`` comes true within ``seconds`` of wall time (polled)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await sleep(0.01)
    return True


# -- raw HTTP/1.1 on loopback -------------------------------------------------------------------

def http_request(port: int, body, headers: dict | None = None, path: str = "/v1/messages",
                 close: bool = True) -> bytes:
    """The bytes of one request, as a client sends them."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/json", f"x-api-key: {SECRET}",
             f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def http_get(port: int, path: str) -> bytes:
    """A GET that asks the server to close the connection after answering: a test client
    must not keep connections of its own open (they would count as ccpd's descriptors)."""
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            "\r\n").encode()


def message(model: str, stream: bool = False) -> dict:
    return {**MESSAGE, "model": model, "stream": stream}


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes       # de-chunked
    complete: bool    # the whole body arrived (content-length reached, last chunk seen)


def parse_responses(data: bytes) -> list[RawResponse]:
    """The HTTP/1.1 responses in ``data``, in order; the last one may be incomplete."""
    responses, at = [], 0
    while at < len(data):
        head_end = data.find(b"\r\n\r\n", at)
        if head_end < 0:
            break
        status_line, *header_lines = data[at:head_end].decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        at = head_end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            pieces, complete = [], False
            while True:
                size_end = data.find(b"\r\n", at)
                if size_end < 0:
                    at = len(data)
                    break
                size = int(data[at:size_end].split(b";")[0], 16)
                pieces.append(data[size_end + 2:size_end + 2 + size])
                if size_end + 2 + size + 2 > len(data):
                    at = len(data)
                    break
                at = size_end + 2 + size + 2
                if size == 0:  # (no trailers are used here)
                    complete = True
                    break
            responses.append(RawResponse(status, headers, b"".join(pieces), complete))
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body = data[at:at + length]
            responses.append(RawResponse(status, headers, body, len(body) == length))
            at += length
        else:  # the body runs to the end of the connection
            responses.append(RawResponse(status, headers, data[at:], True))
            at = len(data)
    return responses


class RawClient(Protocol):
    """Writes ``payload`` (all of it, or the first ``send_only`` bytes) and keeps what comes
    back; aborts once it holds ``abort_after`` bytes, or ``abort_in`` seconds after connecting
    (with an RST when ``rst``, else a FIN). ``closed`` fires with the bytes once the connection
    is gone; ``timeout`` bounds every exchange."""

    def __init__(self, payload: bytes, send_only: int | None = None,
                 abort_after: int | None = None, abort_in: float | None = None,
                 rst: bool = True, timeout: float = 30):
        self.payload = payload if send_only is None else payload[:send_only]
        self.abort_after = abort_after
        self.abort_in = abort_in
        self.rst = rst
        self.timeout = timeout
        self.data = bytearray()
        self.arrivals: list[float] = []  # when each piece came
        self.aborted = False
        self.timed_out = False
        self.reason = None  # why the connection ended (ConnectionDone: FIN, ConnectionLost: RST)
        self.closed: defer.Deferred = defer.Deferred()
        self._timers: list = []

    def connectionMade(self):
        self.transport.write(self.payload)
        if self.abort_in is not None:
            self._timers.append(reactor.callLater(self.abort_in, self.abort))
        self._timers.append(reactor.callLater(self.timeout, self._expire))

    def dataReceived(self, data):
        self.arrivals.append(time.monotonic())
        self.data += data
        if self.abort_after is not None and len(self.data) >= self.abort_after:
            self.abort()

    def abort(self):
        if not self.aborted and self.transport is not None and self.transport.connected:
            self.aborted = True
            if self.rst:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    def _expire(self):
        self.timed_out = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.reason = reason
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self.closed.callback(bytes(self.data))


async def connect(port: int, client: RawClient) -> RawClient:
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30), client)
    return client


async def exchange(port: int, payload: bytes, **options) -> tuple[bytes, float]:
    """Send ``payload`` on a new connection, read until the server closes it (or the client
    aborts); the bytes and the seconds it took."""
    started = time.monotonic()
    client = await connect(port, RawClient(payload, **options))
    data = await client.closed
    assert not client.timed_out, f"no end of exchange in {client.timeout}s: {data[:300]!r}"
    return data, time.monotonic() - started


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event.strip()]


def error_event_type(event: bytes) -> str:
    assert event.startswith(b"event: error\ndata: "), event
    return json.loads(event.split(b"data: ", 1)[1])["error"]["type"]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# -- the upstream breaks ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest_twisted.ensureDeferred
async def test_upstream_reset_mid_stream(shared, stream):
    """The upstream sends part of its answer, then a TCP reset."""
    fake, ccpd = shared.fake, shared.ccpd
    model = f"reset-{'sse' if stream else 'json'}"
    data, took = await exchange(ccpd.port, http_request(
        ccpd.port, message(model, stream), {"x-fake-scenario": "reset-mid-stream"}))
    [response] = parse_responses(data)
    assert response.status == 200
    if stream:
        # every event the upstream sent, then ccpd's error event; a well-ended stream
        sent = b"".join(message_events(model, USAGE, 5)[:5])
        assert response.complete and response.body.startswith(sent)
        events = sse_events(response.body)
        assert len(events) == 6 and error_event_type(events[-1]) == "api_error"
    else:
        # half the body, then the connection is cut (no last chunk): the client sees a
        # short read, not a silently shortened answer
        whole = json.dumps(message_json(model, {**USAGE}, 5), separators=(",", ":")).encode()
        assert not response.complete and response.body == whole[:len(whole) // 2]
    await until(lambda: len(ccpd.lines_for(model)) == 1)
    [line] = ccpd.lines_for(model)
    assert (line["status"], line["err_type"]) == (200, "api_error")
    assert (line["input_tokens"], line["output_tokens"]) == ((12, 1) if stream else (0, 0))
    assert any(a["kind"] == "upstream_broken" for a in ccpd.anomaly_lines()
               if a.get("rid") == line["rid"])
    assert len(seen(fake, model)) == 1
    record(f"reset_mid_stream_{'sse' if stream else 'json'}", client_bytes=len(data),
           seconds_to_end=round(took, 3), usage_lines=1)


@pytest.mark.parametrize("where,stream", [("before-headers", False), ("before-headers", True),
                                          ("mid-body", True), ("mid-body", False)],
                         ids=["before-headers-json", "before-headers-sse", "mid-body-sse",
                              "mid-body-json"])
@pytest_twisted.ensureDeferred
async def test_upstream_stall(shared, where, stream):
    """The upstream falls silent before its headers or in the middle of the body; ccpd's
    ``idle_timeout_s`` is 0.5 s here."""
    fake, ccpd = shared.fake, shared.ccpd
    model = f"stall-{where}-{'sse' if stream else 'json'}"
    data, took = await exchange(ccpd.port, http_request(
        ccpd.port, message(model, stream), {"x-fake-scenario": f"stall-{where}"}))
    [response] = parse_responses(data)
    if where == "before-headers":
        # an Anthropic-shaped 504, streaming asked or not: nothing had been sent yet
        assert response.status == 504 and response.complete
        assert json.loads(response.body)["error"]["type"] == "timeout_error"
        expected = (504, "timeout_error", 0, 0)
    elif stream:
        events = sse_events(response.body)
        assert response.status == 200 and response.complete
        assert response.body.startswith(b"".join(message_events(model, USAGE, 5)[:5]))
        assert len(events) == 6 and error_event_type(events[-1]) == "timeout_error"
        expected = (200, "timeout_error", 12, 1)
    else:
        assert response.status == 200 and not response.complete
        expected = (200, "timeout_error", 0, 0)
    assert took >= 0.5
    # the silent upstream request is given up, not left open
    await until(lambda: fake.in_flight == 0)
    [line] = ccpd.lines_for(model)
    assert (line["status"], line["err_type"], line["input_tokens"],
            line["output_tokens"]) == expected
    record(f"stall_{where.replace('-', '_')}_{'sse' if stream else 'json'}",
           seconds_to_answer=round(took, 3), idle_timeout_s=0.5, status=response.status)


@pytest_twisted.ensureDeferred
async def test_529_storm(make_fake, spawn_ccpd):
    """The upstream is overloaded: 200 requests at once all get Anthropic's 529, then 50
    streams break off with an ``overloaded_error`` event, then the upstream recovers."""
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url())
    await ccpd.start()
    await exchange(ccpd.port, http_request(ccpd.port, message("warm-up")))
    baseline = await settle_fds(ccpd, fake)
    rss_before = ccpd.rss_mb()

    storm = 200
    fake.overloaded = True
    started = time.monotonic()

    async def one(i: int):
        t0 = time.monotonic()
        data, _ = await exchange(ccpd.port, http_request(
            ccpd.port, message(f"storm-{i}", stream=i % 2 == 0)))
        return parse_responses(data), time.monotonic() - t0

    results = await defer.gatherResults([defer.ensureDeferred(one(i)) for i in range(storm)])
    storm_s = time.monotonic() - started
    latencies = sorted(took for _, took in results)
    for responses, _ in results:
        [response] = responses
        assert (response.status, response.body) == (529, OVERLOADED_BODY)
        assert response.headers["x-should-retry"] == "true"
        assert response.headers["request-id"].startswith("req_")
    # ccpd neither retried nor multiplied the load on the overloaded upstream
    assert len([r for r in fake.requests if b"storm-" in r.body]) == storm

    fake.overloaded = False
    broken = 50
    streams = await defer.gatherResults([defer.ensureDeferred(exchange(ccpd.port, http_request(
        ccpd.port, message(f"broken-{i}", stream=True),
        {"x-fake-scenario": "overloaded-mid-stream"}))) for i in range(broken)])
    for data, _ in streams:
        [response] = parse_responses(data)
        assert response.status == 200 and response.complete
        assert error_event_type(sse_events(response.body)[-1]) == "overloaded_error"

    after, _ = await exchange(ccpd.port, http_request(ccpd.port, message("after-storm", True)))
    [response] = parse_responses(after)
    assert response.status == 200 and response.body.endswith(b'{"type":"message_stop"}\n\n')

    lines = ccpd.usage_lines()
    storm_lines = [line for line in lines if line["model"].startswith("storm-")]
    broken_lines = [line for line in lines if line["model"].startswith("broken-")]
    assert len(storm_lines) == storm and len(broken_lines) == broken
    assert {(line["status"], line["err_type"]) for line in storm_lines} == \
        {(529, "overloaded_error")}
    assert {(line["status"], line["err_type"]) for line in broken_lines} == \
        {(200, "overloaded_error")}
    fds_after = await settle_fds(ccpd, fake)
    assert fds_after == baseline
    record("529_storm", requests=storm, concurrent=storm, storm_wall_s=round(storm_s, 3),
           latency_ms_p50=ms(statistics.median(latencies)),
           latency_ms_p99=ms(latencies[int(0.99 * (len(latencies) - 1))]),
           latency_ms_max=ms(latencies[-1]), upstream_requests=storm,
           mid_stream_errors=broken, usage_lines=len(storm_lines) + len(broken_lines),
           fds_baseline=baseline, fds_after=fds_after, rss_mb_before=rss_before,
           rss_mb_after=ccpd.rss_mb())


# -- what the upstream sends is odd -------------------------------------------------------------

async def direct_and_proxied(shared: Shared, model: str, stream: bool, scenario: str):
    """The same request straight to the fake and through ccpd: (direct, proxied) responses."""
    headers = {"x-fake-scenario": scenario}
    fake_port = port_of(shared.fake.url())
    direct, _ = await exchange(fake_port, http_request(fake_port, message(model, stream),
                                                       headers))
    proxied, _ = await exchange(shared.ccpd.port, http_request(
        shared.ccpd.port, message(model, stream), headers))
    [direct_response] = parse_responses(direct)
    [proxied_response] = parse_responses(proxied)
    return direct_response, proxied_response


@pytest.mark.parametrize("scenario", ["malformed-sse", "non-utf8-sse"])
@pytest_twisted.ensureDeferred
async def test_odd_sse_passes_through_byte_for_byte(shared, scenario):
    """Comments, CR and CRLF line ends, nameless events, broken JSON, bytes that are not UTF-8,
    a character cut between two writes: the client gets exactly the upstream's bytes, and the
    usage of the valid events is still accounted."""
    model = scenario
    direct, proxied = await direct_and_proxied(shared, model, True, scenario)
    assert proxied.status == 200 and proxied.complete
    assert proxied.headers["content-type"] == "text/event-stream"
    assert proxied.body == direct.body
    [line] = shared.ccpd.lines_for(model)
    assert (line["status"], line["input_tokens"], line["output_tokens"]) == (200, 12, 5)
    anomalies = [a["kind"] for a in shared.ccpd.anomaly_lines() if a.get("rid") == line["rid"]]
    if scenario == "malformed-sse":
        assert anomalies == ["usage_unparseable"]  # the broken message_delta is reported
    else:
        assert b"\xff\xfe" in proxied.body and line["served_model"] == model
    record(scenario.replace("-", "_"), body_bytes=len(proxied.body), identical=True,
           input_tokens=line["input_tokens"], output_tokens=line["output_tokens"],
           anomalies=anomalies)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_gzip_body_passes_through_untouched(shared, stream):
    """An upstream that compresses although ccpd asked for ``identity``: the client gets the
    compressed bytes and the ``content-encoding`` header unchanged, and they decompress."""
    model = f"gzip-{'sse' if stream else 'json'}"
    direct, proxied = await direct_and_proxied(shared, model, stream, "gzip")
    assert proxied.status == 200 and proxied.complete
    assert proxied.headers["content-encoding"] == "gzip"
    assert proxied.body == direct.body
    plain = gzip.decompress(proxied.body)
    if stream:
        assert plain == b"".join(message_events(model, USAGE, 5))
    else:
        assert json.loads(plain)["usage"]["output_tokens"] == 5
    [line] = shared.ccpd.lines_for(model)
    assert line["status"] == 200
    anomalies = [a["kind"] for a in shared.ccpd.anomaly_lines() if a.get("rid") == line["rid"]]
    record(f"gzip_{'sse' if stream else 'json'}", body_bytes=len(proxied.body), identical=True,
           accounted_tokens=line["input_tokens"] + line["output_tokens"], anomalies=anomalies)


@pytest_twisted.ensureDeferred
async def test_one_endless_sse_line_is_not_held_in_memory(make_fake, spawn_ccpd):
    """An upstream sends an 8 MB ``data:`` line (no line end) in the middle of a stream. The
    client must get it byte for byte, ccpd must not hold the whole line (its peak RSS grows by
    less than the line), and another stream must go on meanwhile (its largest gap between two
    pieces is recorded)."""
    line_bytes = 8 * MiB
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url(), idle_timeout_s=30)
    await ccpd.start()
    await exchange(ccpd.port, http_request(ccpd.port, message("line-warm-up", True)))
    peak_before = ccpd.peak_rss_mb()
    bystander = await connect(ccpd.port, RawClient(http_request(
        ccpd.port, message("line-bystander", True),
        {"x-fake-events": "150", "x-fake-interval-ms": "10"})))
    await until(lambda: b"content_block_delta" in bystander.data)
    headers = {"x-fake-scenario": "endless-line", "x-fake-bytes": str(line_bytes)}
    direct, direct_s = await exchange(port_of(fake.url()), http_request(
        port_of(fake.url()), message("line", True), headers), timeout=60)
    proxied, took = await exchange(ccpd.port, http_request(
        ccpd.port, message("line", True), headers), timeout=60)
    await bystander.closed
    gaps = [b - a for a, b in zip(bystander.arrivals, bystander.arrivals[1:])]
    peak_growth = round(ccpd.peak_rss_mb() - peak_before, 1)
    [response] = parse_responses(proxied)
    assert response.complete and response.body == parse_responses(direct)[0].body
    record("endless_sse_line", line_bytes=line_bytes, seconds_direct=round(direct_s, 2),
           seconds_through_ccpd=round(took, 2),
           rss_mb_peak_growth=peak_growth, bystander_max_gap_ms=ms(max(gaps)))
    assert peak_growth < line_bytes / MiB, f"ccpd's peak RSS grew by {peak_growth} MB"


@pytest_twisted.ensureDeferred
async def test_stream_whose_usage_cannot_be_read_is_reported(shared):
    model = "gzip-sse-unreadable"
    _, proxied = await direct_and_proxied(shared, model, True, "gzip")
    assert proxied.status == 200
    [line] = shared.ccpd.lines_for(model)
    assert line["input_tokens"] == line["output_tokens"] == 0
    assert [a["kind"] for a in shared.ccpd.anomaly_lines() if a.get("rid") == line["rid"]] == \
        ["usage_unparseable"]


# -- what the client does -----------------------------------------------------------------------

def _stalled_reader(port: int, payload: bytes) -> socket.socket:
    """A blocking socket with a small receive buffer that sends ``payload`` and reads nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(payload)
    return sock


def read_to_end(sock: socket.socket, timeout: float = 60) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


async def wait_stalled(fake: FakeUpstream, quiet: float = 0.5, timeout: float = 20) -> int:
    """Wait until the fake's huge stream stops moving for ``quiet`` seconds; the bytes it sent."""
    last, still_since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fake.streamed_bytes != last:
            last, still_since = fake.streamed_bytes, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return last
        await sleep(0.05)
    raise AssertionError(f"the stream never stalled ({fake.streamed_bytes} bytes sent)")


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_a_50_mb_stream(make_fake, spawn_ccpd):
    """A client asks for a 50 MB stream and stops reading. Backpressure must reach the upstream
    (ccpd stops reading it) instead of ccpd buffering the stream; the client that reads again
    gets every byte; the client that leaves ends the upstream request."""
    size = 50 * MiB
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url())
    await ccpd.start()
    warm_up, _ = await exchange(ccpd.port, http_request(
        ccpd.port, message("huge-warm-up", True),
        {"x-fake-scenario": "huge-stream", "x-fake-bytes": str(MiB)}))
    assert parse_responses(warm_up)[0].complete
    baseline = await settle_fds(ccpd, fake)
    rss_before = ccpd.rss_mb()

    # 1. stops reading, then reads again
    payload = http_request(ccpd.port, message("huge-1", True),
                           {"x-fake-scenario": "huge-stream", "x-fake-bytes": str(size)})
    fake.streamed_bytes = 0
    sock = _stalled_reader(ccpd.port, payload)
    stalled_at = await wait_stalled(fake)
    rss_stalled, fds_stalled = ccpd.rss_mb(), ccpd.fds()
    assert stalled_at < size * 0.8, "the upstream was read regardless of the client"
    assert rss_stalled - rss_before < 30, (rss_before, rss_stalled)
    started = time.monotonic()
    data = await deferToThread(read_to_end, sock)
    drain_s = time.monotonic() - started
    [response] = parse_responses(data)
    assert response.status == 200 and response.complete
    assert len(response.body) == fake.streamed_bytes >= size
    deltas = response.body.count(b"event: content_block_delta")
    assert response.body.endswith(b'{"type":"message_stop"}\n\n')
    [line] = ccpd.lines_for("huge-1")
    assert (line["status"], line["output_tokens"]) == (200, deltas)
    peak_rss = ccpd.peak_rss_mb()

    # 2. stops reading, then goes away
    payload = http_request(ccpd.port, message("huge-2", True),
                           {"x-fake-scenario": "huge-stream", "x-fake-bytes": str(size)})
    fake.streamed_bytes = 0
    cancelled = fake.cancelled
    sock = _stalled_reader(ccpd.port, payload)
    stalled_again = await wait_stalled(fake)
    sock.close()
    await until(lambda: fake.cancelled == cancelled + 1 and fake.in_flight == 0)
    await until(lambda: len(ccpd.lines_for("huge-2")) == 1)
    [line] = ccpd.lines_for("huge-2")
    assert (line["status"], line["err_type"]) == (499, "client_disconnected")
    fds_after = await settle_fds(ccpd, fake)
    assert fds_after == baseline
    record("client_stops_reading_50mb", stream_bytes=len(response.body),
           upstream_bytes_sent_when_stalled=stalled_at,
           upstream_bytes_sent_when_stalled_2=stalled_again,
           rss_mb_before=rss_before, rss_mb_stalled=rss_stalled,
           rss_mb_growth_stalled=round(rss_stalled - rss_before, 1), rss_mb_peak=peak_rss,
           rss_mb_after=ccpd.rss_mb(), fds_baseline=baseline, fds_stalled=fds_stalled,
           fds_after=fds_after, drain_s=round(drain_s, 2),
           drain_mb_per_s=round(len(data) / MiB / drain_s, 1), text_deltas=deltas)


ABORT_MODES = ("mid-headers", "before-answer", "mid-body", "complete")


@pytest_twisted.ensureDeferred
async def test_random_client_aborts(make_fake, spawn_ccpd):
    """120 clients at once; each at random sends part of its headers and leaves, leaves before
    the answer, leaves in the middle of the stream or reads it all. Every upstream request
    ends, every request that reached ccpd has one usage line, and ccpd's descriptors come back
    to where they were. Each client leaves with a reset (RST) or an orderly close (FIN)."""
    seed = int(os.environ.get("CCPD_FAULT_SEED", "1729"))
    rng = random.Random(seed)
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url())
    await ccpd.start()
    await exchange(ccpd.port, http_request(ccpd.port, message("abort-warm-up", True)))
    baseline = await settle_fds(ccpd, fake)
    rss_before = ccpd.rss_mb()

    plans = []
    for i in range(120):
        mode = rng.choice(ABORT_MODES)
        headers = {"x-fake-events": "40", "x-fake-interval-ms": str(rng.randint(2, 5))}
        options: dict = {"rst": rng.random() < 0.5}
        if mode == "mid-headers":
            whole = http_request(ccpd.port, message(f"abort-{i}", True), headers)
            options["send_only"] = rng.randint(20, whole.index(b"\r\n\r\n"))
            options["abort_in"] = 0.02
        elif mode == "before-answer":
            headers["x-fake-first-byte-ms"] = "400"
            options["abort_in"] = rng.uniform(0.02, 0.15)
        elif mode == "mid-body":
            options["abort_after"] = rng.randint(300, 2500)
        plans.append((i, mode, http_request(ccpd.port, message(f"abort-{i}", True), headers),
                      options))

    peak = {"fds": 0, "client": 0, "upstream": 0}

    def sample():
        sockets = ccpd.sockets()
        peak["fds"] = max(peak["fds"], ccpd.fds())
        peak["client"] = max(peak["client"], sockets["client"])
        peak["upstream"] = max(peak["upstream"], sockets["upstream"])

    sampler = task.LoopingCall(sample)
    sampler.start(0.02)
    started = time.monotonic()
    clients = await defer.gatherResults([defer.ensureDeferred(connect(
        ccpd.port, RawClient(payload, **options))) for _, _, payload, options in plans])
    results = await defer.gatherResults([client.closed for client in clients])
    await until(lambda: fake.in_flight == 0, 10)
    settle_s = time.monotonic() - started
    sampler.stop()

    by_model: dict[str, list] = {}
    for line in ccpd.usage_lines():
        by_model.setdefault(line["model"], []).append(line)
    upstream = {}
    for request in fake.requests:
        model = json.loads(request.body)["model"]
        assert model not in upstream, f"{model} was sent upstream twice"
        upstream[model] = request
    counts: Counter = Counter()
    for (i, mode, _, _), client, data in zip(plans, clients, results):
        model = f"abort-{i}"
        lines = by_model.get(model, [])
        counts[mode] += 1
        assert not client.timed_out, (mode, data[:200])
        if mode == "mid-headers":
            # never a whole request: nothing forwarded, nothing accounted
            assert model not in upstream and lines == [], (mode, lines)
            continue
        assert len(lines) == 1, (model, mode, lines)
        status = lines[0]["status"]
        if mode == "complete":
            [response] = parse_responses(data)
            assert response.complete
            assert response.body.count(b"event: content_block_delta") == 40
            assert (status, lines[0]["output_tokens"]) == (200, 40)
            assert upstream[model].outcome == "finished"
        elif mode == "before-answer":
            assert (status, lines[0]["err_type"]) == (499, "client_disconnected")
            assert upstream.get(model) is None or upstream[model].outcome == "cancelled"
        else:
            assert status in (200, 499)
            counts["mid-body-499"] += status == 499
    # every upstream request ended, and each has its usage line
    assert {request.outcome for request in upstream.values()} <= {"finished", "cancelled"}
    assert set(upstream) <= set(by_model)
    fds_after = await settle_fds(ccpd, fake)
    assert fds_after == baseline, dict(ccpd.sockets())
    ok, _ = await exchange(ccpd.port, http_request(ccpd.port, message("abort-after", True)))
    assert parse_responses(ok)[0].complete
    record("random_client_aborts", seed=seed, clients=len(plans), modes=dict(counts),
           upstream_requests=len(upstream) - 1,
           upstream_cancelled=sum(r.outcome == "cancelled" for r in upstream.values()),
           seconds_until_upstream_idle=round(settle_s, 2), fds_baseline=baseline,
           fds_peak=peak["fds"], client_sockets_peak=peak["client"],
           upstream_sockets_peak=peak["upstream"], fds_after=fds_after,
           rss_mb_before=rss_before, rss_mb_after=ccpd.rss_mb())


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    """A fake and a ccpd that waits 30 s for a silent upstream: whatever ends an upstream
    request in these cases is the client going away, not ccpd's idle timeout."""
    fake = FakeUpstream(reactor)
    port = fake.listen(0)
    ccpd = CcpdProcess(tmp_path_factory.mktemp("patient"), fake.url(), idle_timeout_s=30)
    pytest_twisted.blockon(defer.ensureDeferred(ccpd.start()))
    yield Shared(fake, ccpd)
    ccpd.kill()
    pytest_twisted.blockon(port.stopListening())


@pytest.mark.parametrize("when,how", [(when, how) for when in ("mid-headers", "before-answer",
                                                                 "paused-stream")
                                      for how in ("rst", "fin")])
@pytest_twisted.ensureDeferred
async def test_client_that_goes_away_is_noticed_at_once(patient, when, how):
    """A client leaves (RST, or an orderly close: FIN) half-way through its headers, while the
    upstream has not answered yet, or while its stream is quiet: within a second ccpd has let
    go of the connection, cancelled the upstream request and written a 499 line."""
    fake, ccpd = patient.fake, patient.ccpd
    model = f"gone-{when}-{how}"
    stream = when == "paused-stream"
    scenario = "hang-after-headers" if stream else "stall-before-headers"
    payload = http_request(ccpd.port, message(model, stream), {"x-fake-scenario": scenario})
    client = RawClient(payload, rst=how == "rst",
                       send_only=40 if when == "mid-headers" else None)
    await connect(ccpd.port, client)
    client_port = client.transport.getHost().port
    if when == "mid-headers":
        await until(lambda: client_port in ccpd.client_ports())
    elif when == "before-answer":
        await until(lambda: seen(fake, model))
    else:
        await until(lambda: b"message_start" in client.data)
    client.abort()
    await client.closed
    left = time.monotonic()
    noticed = await within(1.0, lambda: client_port not in ccpd.client_ports() and (
        when == "mid-headers" or (seen(fake, model)[0].outcome == "cancelled"
                                  and ccpd.lines_for(model))))
    assert noticed, (
        f"1 s after the client left, ccpd holds its socket: "
        f"{client_port in ccpd.client_ports()}; upstream request: "
        f"{[r.outcome or 'in flight' for r in seen(fake, model)]}; usage lines: "
        f"{[line['status'] for line in ccpd.lines_for(model)]}")
    noticed_ms = ms(time.monotonic() - left)
    if when != "mid-headers":
        [line] = ccpd.lines_for(model)
        assert (line["status"], line["err_type"]) == (499, "client_disconnected")
    record("client_goes_away", **{f"{when}_{how}": {"noticed_within_ms": noticed_ms}})


# -- bytes that are not one well-formed request -------------------------------------------------

def _raw(port: int, head: str, body: bytes) -> bytes:
    return (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nx-api-key: {SECRET}\r\n{head}\r\n").encode() + body


def smuggling_shapes(port: int) -> dict[str, bytes]:
    """Requests whose length is ambiguous; each hides a second request in its body."""
    body = json.dumps(message("smuggled-outer")).encode()
    inner = http_request(port, message("smuggled-inner"), close=False)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return {
        "cl-te": _raw(port, f"Content-Length: {len(b'0' + inner) + 4}\r\n"
                            "Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + inner),
        "te-cl": _raw(port, "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                      b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)),
        "two-content-lengths": _raw(port, f"Content-Length: {len(body)}\r\n"
                                          f"Content-Length: {len(body) + len(inner)}\r\n",
                                    body + inner),
        "content-length-list": _raw(port, f"Content-Length: {len(body)}, {len(body)}\r\n",
                                    body + inner),
        "content-length-sign": _raw(port, f"Content-Length: +{len(body)}\r\n", body + inner),
        "te-not-last-chunked": _raw(port, "Transfer-Encoding: chunked, identity\r\n",
                                    chunked + inner),
        "chunk-size-not-hex": _raw(port, "Transfer-Encoding: chunked\r\n",
                                   b"zz\r\n" + body + b"\r\n0\r\n\r\n" + inner),
        "chunk-size-negative": _raw(port, "Transfer-Encoding: chunked\r\n",
                                    b"-1\r\n" + body + b"\r\n0\r\n\r\n" + inner),
        "chunk-size-0x": _raw(port, "Transfer-Encoding: chunked\r\n",
                              b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + inner),
        "chunk-shorter-than-size": _raw(port, "Transfer-Encoding: chunked\r\n",
                                        b"2\r\n" + body + b"\r\n0\r\n\r\n" + inner),
    }


SMUGGLING = list(smuggling_shapes(1))


@pytest.mark.parametrize("shape", SMUGGLING)
@pytest_twisted.ensureDeferred
async def test_request_smuggling_shapes_get_400_and_nothing_is_forwarded(shared, shape):
    fake, ccpd = shared.fake, shared.ccpd
    upstream_before, lines_before = len(fake.requests), len(ccpd.usage_lines())
    data, took = await exchange(ccpd.port, smuggling_shapes(ccpd.port)[shape], timeout=10)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert data.count(b"HTTP/1.1 ") == 1  # the hidden request got no answer: it was not run
    await sleep(0.1)
    assert len(fake.requests) == upstream_before
    assert len(ccpd.usage_lines()) == lines_before
    record("request_smuggling", **{shape: {"status": 400, "upstream_requests": 0,
                                           "ms": ms(took)}})


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("size", [b"1" + b"0" * 20, b"%x" % (64 * 1024 + 1)],
                         ids=["2**80", "over-max_body_bytes"])
async def test_chunk_larger_than_the_body_limit_gets_413_at_once(shared, size):
    """A chunk-size past [server] max_body_bytes (64 KiB in this config) is refused as soon as
    its size line is in, without waiting for bytes ccpd would not keep."""
    fake, ccpd = shared.fake, shared.ccpd
    upstream_before = len(fake.requests)
    body = json.dumps(message("chunk-overflow")).encode()
    payload = _raw(ccpd.port, "Transfer-Encoding: chunked\r\n",
                   size + b"\r\n" + body)
    started = time.monotonic()
    client = await connect(ccpd.port, RawClient(payload, timeout=1.5))
    data = await client.closed
    took = client.arrivals[0] - started if client.arrivals else None
    assert len(fake.requests) == upstream_before
    [answer] = parse_responses(data)
    assert answer.status == 413, f"after 1.5 s: {data!r}"
    assert json.loads(answer.body)["error"]["type"] == "request_too_large"
    record("chunk_over_body_limit", **{size.decode(): {
        "status": answer.status, "upstream_requests": 0, "answered_ms": ms(took)}})


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(shared):
    """Two requests in one write, the first slower (its upstream waits 200 ms) and streamed:
    two answers in the order asked, two usage lines."""
    fake, ccpd = shared.fake, shared.ccpd
    payload = (http_request(ccpd.port, message("pipe-1", True),
                            {"x-fake-first-byte-ms": "200", "x-fake-events": "3"}, close=False)
               + http_request(ccpd.port, message("pipe-2"), {"x-fake-events": "2"}))
    data, took = await exchange(ccpd.port, payload)
    first, second = parse_responses(data)
    assert (first.status, second.status) == (200, 200)
    assert first.complete and first.headers["content-type"] == "text/event-stream"
    assert b'"model":"pipe-1"' in first.body and first.body.count(b"event: content_block_delta") == 3
    assert second.complete and json.loads(second.body)["model"] == "pipe-2"
    models = [line["model"] for line in ccpd.usage_lines() if line["model"].startswith("pipe-")]
    assert models == ["pipe-1", "pipe-2"]
    assert [json.loads(r.body)["model"] for r in fake.requests
            if b'"pipe-' in r.body] == ["pipe-1", "pipe-2"]
    record("pipelining", requests=2, answers_in_order=True, usage_lines=2,
           seconds_for_both=round(took, 3))


# -- the process is stopped ---------------------------------------------------------------------

def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest_twisted.ensureDeferred
async def test_sigterm_with_streams_in_flight_writes_every_usage_line(make_fake, spawn_ccpd):
    """SIGTERM while 20 streams are under way: new connections are refused at once, the 20
    streams finish, each has its usage line and its row in the store, and ccpd exits."""
    streams = 20
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url())
    await ccpd.start()
    clients = await defer.gatherResults([defer.ensureDeferred(connect(ccpd.port, RawClient(
        http_request(ccpd.port, message(f"term-{i}", True),
                     {"x-fake-events": "60", "x-fake-interval-ms": "25"}))))
        for i in range(streams)])
    await until(lambda: all(b"content_block_delta" in c.data for c in clients))
    in_flight_at_signal = fake.in_flight
    assert in_flight_at_signal == streams
    started = time.monotonic()
    ccpd.child.send_signal(signal.SIGTERM)
    await until(lambda: _refused(ccpd.port), 5)
    refused_after = time.monotonic() - started
    code = await deferToThread(ccpd.child.wait, 20)
    exit_s = time.monotonic() - started
    assert code == -signal.SIGTERM
    for client in clients:
        [response] = parse_responses(await client.closed)
        assert response.complete and response.body.count(b"event: content_block_delta") == 60
        assert response.body.endswith(b'{"type":"message_stop"}\n\n')
    lines = [line for line in ccpd.usage_lines() if line["model"].startswith("term-")]
    assert sorted(line["model"] for line in lines) == sorted(f"term-{i}" for i in
                                                             range(streams))
    assert {(line["status"], line["output_tokens"]) for line in lines} == {(200, 60)}
    with sqlite3.connect(ccpd.db) as db:
        rows = {model for (model,) in db.execute("SELECT model FROM usage_sample")}
    assert {line["model"] for line in lines} <= rows
    record("sigterm_streams_in_flight", streams=streams,
           upstream_in_flight_at_signal=in_flight_at_signal,
           seconds_until_refusing=round(refused_after, 3), seconds_until_exit=round(exit_s, 2),
           exit_code=code, usage_lines=len(lines), store_rows=len(rows))


@pytest_twisted.ensureDeferred
async def test_kill_9_loses_nothing(make_fake, spawn_ccpd):
    """kill -9 right after 40 answers (3 more streams still in flight): every answered request
    has a whole line in usage.jsonl, and the next start refills the store from it."""
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url(), idle_timeout_s=30)
    await ccpd.start()
    hanging = await defer.gatherResults([defer.ensureDeferred(connect(ccpd.port, RawClient(
        http_request(ccpd.port, message(f"k9-hanging-{i}", True),
                     {"x-fake-scenario": "stall-mid-body"})))) for i in range(3)])
    answered = 40
    semaphore = defer.DeferredSemaphore(8)

    async def one(i: int):
        data, _ = await exchange(ccpd.port, http_request(
            ccpd.port, message(f"k9-{i}", stream=i % 2 == 0), {"x-fake-input-tokens": str(i)}))
        [response] = parse_responses(data)
        assert response.status == 200 and response.complete

    await defer.gatherResults([semaphore.run(lambda i=i: defer.ensureDeferred(one(i)))
                               for i in range(answered)])
    code = await ccpd.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    for client in hanging:
        [response] = parse_responses(await client.closed)
        assert not response.complete  # cut off: the client sees it, no message_stop
    text = (ccpd.logs / "usage.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]  # no torn line
    assert sorted(line["model"] for line in lines) == sorted(f"k9-{i}" for i in range(answered))
    logged = {(line["ts"], line["rid"]) for line in lines}
    with sqlite3.connect(ccpd.db) as db:
        try:
            rows_at_kill = db.execute("SELECT count(*) FROM usage_sample").fetchone()[0]
        except sqlite3.OperationalError as e:
            # on a loaded machine the kill can come before the store's schema is written:
            # then everything must come back from usage.jsonl alone
            assert "no such table" in str(e), e
            rows_at_kill = rows_before_restart = 0
        else:
            # whatever the writer managed before the kill, make sure rows are missing for real
            db.execute("DELETE FROM usage_sample WHERE rid IN "
                       "(SELECT rid FROM usage_sample ORDER BY ts DESC LIMIT 5)")
            rows_before_restart = db.execute("SELECT count(*) FROM usage_sample").fetchone()[0]

    restart_s = await ccpd.start()
    data, _ = await exchange(ccpd.port, http_get(ccpd.port,
                                                 "/v1/usage/samples?since=0&limit=10000"))
    [response] = parse_responses(data)
    served = {(row["ts"], row["rid"]) for rows in json.loads(response.body)["models"].values()
              for row in rows}
    assert response.status == 200 and served == logged
    with sqlite3.connect(ccpd.db) as db:
        stored = set(db.execute("SELECT ts, rid FROM usage_sample"))
    assert stored == logged
    assert await ccpd.stop() == -signal.SIGTERM
    log_text = ccpd.output.read_text()
    recovered = re.findall(r"store: recovered (\d+) samples", log_text)
    assert recovered
    record("kill_9", answered=answered, in_flight_at_kill=len(hanging), usage_lines=len(lines),
           store_rows_at_kill=rows_at_kill, store_rows_before_restart=rows_before_restart,
           store_rows_after_restart=len(stored), restart_s=round(restart_s, 2),
           samples_recovered_at_restart=int(recovered[-1]))


# -- many connections ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_1000_concurrent_connections(make_fake, spawn_ccpd):
    """1000 clients connect at once, each asking for a stream; the upstream holds every answer
    until all 1000 are in flight at the same time, then lets them go. Every client gets its
    whole stream, every request its usage line, and the descriptors come back."""
    clients_n = 1000
    fake = make_fake()
    ccpd = spawn_ccpd(fake.url(), server_extra=OVERLOAD_KEYS, idle_timeout_s=60)
    await ccpd.start()
    await exchange(ccpd.port, http_request(ccpd.port, message("conn-warm-up", True)))
    baseline = await settle_fds(ccpd, fake)
    rss_before = ccpd.rss_mb()

    started = time.monotonic()
    clients = await defer.gatherResults([defer.ensureDeferred(connect(ccpd.port, RawClient(
        http_request(ccpd.port, message(f"conn-{i}", True), {"x-fake-scenario": "gate"}),
        timeout=60))) for i in range(clients_n)])
    connected_s = time.monotonic() - started
    all_in_flight = await within(30, lambda: fake.in_flight == clients_n)
    assert all_in_flight, (
        f"{fake.in_flight} of {clients_n} requests reached the upstream; answers so far: "
        f"{Counter(bytes(c.data[:12]) for c in clients if c.closed.called)}")
    all_in_flight_s = time.monotonic() - started
    fds_peak, sockets_peak, rss_in_flight = ccpd.fds(), ccpd.sockets(), ccpd.rss_mb()
    released = time.monotonic()
    assert fake.open_gate() == clients_n
    results = await defer.gatherResults([client.closed for client in clients])
    done_s = time.monotonic() - released

    for i, data in enumerate(results):
        [response] = parse_responses(data)
        assert response.status == 200 and response.complete, (i, data[:200])
        assert response.body.count(b"event: content_block_delta") == 5
        assert f'"model":"conn-{i}"'.encode() in response.body
    lines = [line for line in ccpd.usage_lines() if line["model"].startswith("conn-")
             and line["model"] != "conn-warm-up"]
    assert len(lines) == clients_n and len({line["model"] for line in lines}) == clients_n
    assert {line["status"] for line in lines} == {200}
    assert fake.peak_in_flight == clients_n
    fds_after = await settle_fds(ccpd, fake, timeout=20)
    assert fds_after == baseline
    record("1000_concurrent_connections", clients=clients_n,
           seconds_to_connect_all=round(connected_s, 2),
           seconds_until_all_in_flight_upstream=round(all_in_flight_s, 2),
           seconds_to_finish_all_after_release=round(done_s, 2), upstream_peak_in_flight=
           fake.peak_in_flight, usage_lines=len(lines), fds_baseline=baseline,
           fds_peak=fds_peak, client_sockets_peak=sockets_peak["client"],
           upstream_sockets_peak=sockets_peak["upstream"], fds_after=fds_after,
           rss_mb_before=rss_before, rss_mb_all_in_flight=rss_in_flight,
           rss_kb_per_request_in_flight=round((rss_in_flight - rss_before) * 1024 / clients_n,
                                              1),
           rss_mb_peak=ccpd.peak_rss_mb(), rss_mb_after=ccpd.rss_mb())

"""Shared test helpers: the test config, ccpd built in-process (in memory or on loopback), the
clients that talk to it and readers of what it writes.

Two ways to run ccpd, both built by :func:`build_ccpd_service` (so wiring that changes, a
resource wrapped in a guard, a new service, is followed in one place):

- :func:`build_memory_ccpd`: ccpd on a ``MemoryReactorClock``. Its clients, its site and its
  upstreams talk over in-memory connections (:class:`MemoryNetwork`), time moves only when a
  test advances the clock, and no socket or thread is used. For request logic: validation,
  error shapes, routing, reroute decisions, timeouts driven by the clock.
- :func:`start_loopback_ccpd`: ccpd on the real reactor, listening on a loopback port, for what
  sockets are the point of: streaming to real clients, disconnects, the anthropic SDK, scripts.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import treq
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

from ccpd import tap
from ccpd.config import config_from_string
from ccpd.lanes import BytesProducer
from ccpd.store import service as store_service
from ccpd.store.schema import migrate
from ccpd.store.sqlite import MEMORY, SQLiteStore
from ccpd.tap import build_service
from ccpd.testing.fakeupstream import FakeUpstream

SECRET = "sk-ant-client-secret-0123456789"
ZAI_SECRET = "zai-secret-key-123"
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": "hello"}]}

# -- the config ---------------------------------------------------------------------------------

LOOPBACK_LISTEN = "tcp:0:interface=127.0.0.1"


def ccpd_ini(tmp_path, upstream_url: str, extra: str = "", zai_url: str | None = None,
             server_extra: str = "", store_extra: str = "",
             listen: str = LOOPBACK_LISTEN) -> str:
    """The INI text of the test ccpd: an ``anthropic`` passthrough lane at ``upstream_url``, a
    ``zai`` lane (key from ``ZAI_TEST_KEY``) at ``zai_url`` (default: the same upstream) under
    ``/api/anthropic``, routes for ``glm-4.6`` (with a secondary) and ``glm-solo``, logs and
    store under ``tmp_path``. ``tmp_path/quotas.json`` is created empty unless it exists."""
    quotas = tmp_path / "quotas.json"
    if not quotas.exists():
        quotas.write_text(json.dumps({"models": {}}))
    return f"""
[server]
listen = {listen}
max_body_bytes = 65536
{server_extra}

[lane:anthropic]
base_url = {upstream_url}
idle_timeout_s = 2
connect_timeout_s = 2

[lane:zai]
base_url = {zai_url or upstream_url}/api/anthropic
auth = env:ZAI_TEST_KEY
idle_timeout_s = 2
reset_tz = +08:00

[routes]
glm-4.6 = zai, anthropic/claude-sonnet-4-5
glm-solo = zai

[quotas]
file = {quotas}

[logs]
dir = {tmp_path}/logs
max_bytes = 1048576
backups = 2

[store]
path = {tmp_path}/logs/ccp.sqlite3
{store_extra}
{extra}
"""


def build_ccpd_service(tmp_path, reactor, upstream_url: str, *, extra: str = "",
                       environ: dict | None = None, zai_url: str | None = None,
                       server_extra: str = "", store_extra: str = "",
                       listen: str = LOOPBACK_LISTEN):
    """ccpd's service tree, not started, built from :func:`ccpd_ini` as ``twistd`` builds it.
    ``environ`` defaults to a ``ZAI_TEST_KEY`` of :data:`ZAI_SECRET`."""
    text = ccpd_ini(tmp_path, upstream_url, extra, zai_url, server_extra, store_extra, listen)
    config = config_from_string(text, source="test.ini", environ={})
    return build_service(config, reactor,
                         environ if environ is not None else {"ZAI_TEST_KEY": ZAI_SECRET})


# -- what ccpd writes ---------------------------------------------------------------------------

def read_jsonl(path) -> list[dict]:
    """Every line of a JSONL file (none when it does not exist). Strict: a line that is not
    JSON fails the test, since ccpd must never write one."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _CcpdReadings:
    """What a test reads of a ccpd: its log lines and its metrics."""

    service: object
    logs_dir: str

    def usage_lines(self) -> list[dict]:
        return read_jsonl(os.path.join(self.logs_dir, "usage.jsonl"))

    def anomaly_lines(self) -> list[dict]:
        return read_jsonl(os.path.join(self.logs_dir, "anomaly.jsonl"))

    @property
    def metrics(self):
        return self.service.app.metrics

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of ccpd's registry (``ccp_requests_total``, ``..._count``), None when it
        was never set."""
        return self.metrics.registry.get_sample_value(name, labels)


# -- clients on real sockets --------------------------------------------------------------------

async def post(url, body, headers=None, **kwargs):
    """POST ``body`` (bytes, or an object sent as JSON) with the client's key."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", "x-api-key": SECRET, **(headers or {})}
    return await treq.post(url, data=data, headers=hdrs, **kwargs)


async def until(predicate, timeout=5.0):
    """Wait (bounded) on the real reactor until ``predicate()`` is true: only for what a real
    socket or process does in its own time."""
    from twisted.internet import reactor
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


def free_port() -> int:
    """A loopback port nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- ccpd as a process ---------------------------------------------------------------------------

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


async def wait_healthy(url: str, child: subprocess.Popen) -> None:
    """Wait (15 s at most) until the ``twistd`` in ``child`` answers ``/healthz`` at ``url``."""
    from twisted.internet import reactor
    for _ in range(1500):
        assert child.poll() is None, "twistd exited during start-up"
        try:
            response = await treq.get(url + "/healthz", timeout=1)
            if response.code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("ccpd did not become healthy")


# -- ccpd on loopback ---------------------------------------------------------------------------

@dataclass
class RunningCcpd(_CcpdReadings):
    """ccpd on the real reactor, listening at ``url``."""

    service: object
    url: str
    logs_dir: str


async def start_loopback_ccpd(tmp_path, upstream_url: str, **options) -> RunningCcpd:
    """Start ccpd in this process on a free loopback port (``options``: those of
    :func:`build_ccpd_service`); the caller stops ``service``."""
    from twisted.internet import reactor
    service = build_ccpd_service(tmp_path, reactor, upstream_url, **options)
    service.startService()
    # StreamServerEndpointService has no public way to the port it got (it listens on port 0)
    port = await service.web._waitingForPort
    return RunningCcpd(service, f"http://127.0.0.1:{port.getHost().port}",
                       str(tmp_path / "logs"))


# -- in memory ------------------------------------------------------------------------------------

@implementer(IAgentEndpointFactory)
class MemoryNetwork:
    """Hosts that serve HTTP in memory, and the connections made to them.

    It is an ``IAgentEndpointFactory``: an ``Agent`` over it connects to the site served at the
    URI's host and port (a host nobody serves refuses the connection). Nothing moves until
    :meth:`flush`, which carries bytes both ways on every connection, and runs the clock's
    zero-delay calls, until all is quiet.

    The connections are ``twisted.test.iosim``'s (Twisted's own in-memory transports, which
    ``treq.testing`` uses too); unlike ``StubTreq``, which serves a resource through a plain
    ``Site`` of its own, this serves the very factory ccpd listens with.
    """

    def __init__(self, clock):
        self.clock = clock
        self._sites: dict[tuple[bytes, int], tuple[object, IPv4Address]] = {}
        self._pumps: list[iosim.IOPump] = []
        self._clients = 0

    def serve(self, host: str, port: int, site, address: IPv4Address | None = None) -> None:
        """Serve ``site`` (a server factory) at ``host:port``; its connections report
        ``address`` as their local address (default: 127.0.0.1 and ``port``)."""
        self._sites[(host.encode("ascii"), port)] = (
            site, address or IPv4Address("TCP", "127.0.0.1", port))

    def endpointForURI(self, uri):
        return _MemoryEndpoint(self, uri.host, uri.port)

    def connect(self, host: bytes, port: int, factory) -> defer.Deferred:
        served = self._sites.get((host, port))
        if served is None:
            return defer.fail(error.ConnectionRefusedError(f"{host.decode()}:{port}"))
        site, server_address = served
        self._clients += 1
        client_address = IPv4Address("TCP", "127.0.0.1", 40000 + self._clients)
        server = site.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, True, server_address, client_address),
            client, iosim.FakeTransport(client, False, client_address, server_address),
            greet=False, clock=self.clock)
        self._pumps.append(pump)
        return defer.succeed(client)

    def flush(self) -> bool:
        """Move everything that can move now; whether anything did."""
        moved = False
        for _ in range(1000):
            self.clock.advance(0)
            round_moved = False
            for pump in list(self._pumps):
                round_moved = pump.flush() or round_moved
            self._pumps = [pump for pump in self._pumps
                           if not (pump.clientIO.disconnected and pump.serverIO.disconnected)]
            if not round_moved:
                return moved
            moved = True
        raise AssertionError("the in-memory network never went quiet")


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, network: MemoryNetwork, host: bytes, port: int):
        self._network, self._host, self._port = network, host, port

    def connect(self, factory):
        return self._network.connect(self._host, self._port, factory)


def _body_bytes(data) -> BytesProducer:
    return BytesProducer(data.encode("utf-8") if isinstance(data, str) else data)


@dataclass
class Answer:
    """A whole HTTP answer as the client got it."""

    code: int
    headers: Headers
    body: bytes

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def error(self) -> tuple[int, str]:
        """``(status, error type)`` of an answer in Anthropic's error shape."""
        body = self.json()
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
        return self.code, body["error"]["type"]


class SynchronousStore(SQLiteStore):
    """ccpd's SQLite store, run on the calling thread instead of adbapi's: the same file,
    schema and transactions (commit after each function, rollback on error), so that a test
    on a Clock never waits for a thread. The adbapi store itself is covered by the loopback
    tests and ``tests/test_store.py``."""

    def startService(self):
        Service.startService(self)
        if self.path != MEMORY:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.connection = sqlite3.connect(self.path)
        self.ready = self.run(migrate)
        return self.ready

    def stopService(self):
        Service.stopService(self)
        self.connection.close()

    def run(self, function, *args):
        try:
            result = function(self.connection.cursor(), *args)
        except Exception:  # noqa: BLE001 - the failure goes to the caller, as with adbapi
            self.connection.rollback()
            return defer.fail()
        self.connection.commit()
        return defer.succeed(result)


UPSTREAM_URL = "http://upstream.test"   # the fake upstream of every lane, unless told otherwise
ZAI_URL = "http://zai.test"             # a second fake, for the zai lane alone
CCPD_PORT = 8787


@dataclass
class MemoryCcpd(_CcpdReadings):
    """ccpd started on a ``MemoryReactorClock`` (``clock``), with its lanes and its clients on
    a :class:`MemoryNetwork`. ``upstream`` is the fake upstream at :data:`UPSTREAM_URL`,
    ``zai`` the zai lane's (the same one unless a second fake was asked for).

    Requests are synchronous: :meth:`request` returns the whole answer once the network is
    quiet, and fails if it is not there then (it waits on the clock: :meth:`send`, then
    :meth:`advance`, then :meth:`settle`).
    """

    service: object
    clock: MemoryReactorClock
    network: MemoryNetwork
    upstream: FakeUpstream
    zai: FakeUpstream
    logs_dir: str
    url: str = f"http://127.0.0.1:{CCPD_PORT}"
    client: HTTPClient = field(init=False)

    def __post_init__(self):
        agent = Agent.usingEndpointFactory(
            self.clock, self.network, pool=HTTPConnectionPool(self.clock, persistent=False))
        self.client = HTTPClient(agent, data_to_body_producer=_body_bytes)

    def send(self, method: str, url: str, body: bytes | None = None,
             headers: dict | None = None) -> defer.Deferred:
        """Start a request to ``url`` (a path is ccpd's); fires with an :class:`Answer`."""
        if url.startswith("/"):
            url = self.url + url

        async def whole() -> Answer:
            response = await self.client.request(method, url, data=body, headers=headers)
            return Answer(response.code, response.headers, await response.content())

        d = defer.ensureDeferred(whole())
        self.network.flush()
        return d

    def settle(self, d: defer.Deferred):
        """The result of ``d`` once the network is quiet; fails the test if it has none."""
        result = self._outcome(d)
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def failure_of(self, d: defer.Deferred) -> Failure:
        """The failure ``d`` ends with once the network is quiet (a cut-off answer)."""
        result = self._outcome(d)
        assert isinstance(result, Failure), f"no failure: {result!r}"
        return result

    def _outcome(self, d: defer.Deferred):
        self.network.flush()
        results = []
        d.addBoth(results.append)
        assert not self.clock.tcpClients, (
            f"ccpd connected past the memory network: {self.clock.tcpClients}; "
            f"build_memory_ccpd must route the lanes anew")
        assert results, "no answer yet: it waits on the clock or on something never sent"
        return results[0]

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict | None = None) -> Answer:
        return self.settle(self.send(method, url, body, headers))

    def get(self, url: str, headers: dict | None = None) -> Answer:
        return self.request("GET", url, headers=headers)

    def post(self, url: str, body=b"", headers: dict | None = None) -> Answer:
        """POST like :func:`post`: JSON (unless ``body`` is bytes) with the client's key."""
        return self.settle(self.send_post(url, body, headers))

    def send_post(self, url: str, body=b"", headers: dict | None = None) -> defer.Deferred:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.send("POST", url, data, {"content-type": "application/json",
                                             "x-api-key": SECRET, **(headers or {})})

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Let ``seconds`` pass on ccpd's clock (and the fakes'), flushing the network after
        every ``step`` (default: one jump), as the time would pass for real."""
        step = step or seconds
        while seconds > 1e-9:
            self.clock.advance(min(step, seconds))
            seconds -= step
            self.network.flush()

    def stop(self) -> None:
        """Stop ccpd, letting the grace for requests in flight pass on the clock."""
        stopped = self.service.stopService()
        self.network.flush()
        if not stopped.called:
            self.advance(tap.STOP_GRACE_S)
        self.settle(stopped)


def build_memory_ccpd(tmp_path, *, upstream_url: str = UPSTREAM_URL, zai: dict | None = None,
                      zai_url: str | None = None, **options) -> MemoryCcpd:
    """Start ccpd in memory (``options``: those of :func:`build_ccpd_service`), in front of a
    fake upstream at :data:`UPSTREAM_URL`, and of a second one at :data:`ZAI_URL` for the zai
    lane when ``zai`` (its ``FakeUpstream`` options) is given. A lane at any other URL finds
    nothing there: its connections are refused. The caller stops it (:meth:`MemoryCcpd.stop`).
    """
    clock = MemoryReactorClock()
    # Near the wall clock (the fakes date their limit answers by it), at a whole hour (rollups
    # of a test fall in one hour and one day).
    clock.advance(int(time.time()) // 3600 * 3600)
    network = MemoryNetwork(clock)
    upstream = _serve_fake(network, FakeUpstream(clock), UPSTREAM_URL)
    zai_fake = upstream
    if zai is not None:
        zai_fake = _serve_fake(network, FakeUpstream(clock, **zai), ZAI_URL)
        zai_url = zai_url or ZAI_URL
    # No thread may run under a Clock: the store runs its SQL on the calling thread.
    with mock.patch.object(store_service, "SQLiteStore", SynchronousStore):
        service = build_ccpd_service(tmp_path, clock, upstream_url, zai_url=zai_url,
                                     listen=f"tcp:{CCPD_PORT}:interface=127.0.0.1", **options)
    assert isinstance(service.getServiceNamed("store-service").store, SynchronousStore), \
        "the store is no longer made where build_memory_ccpd replaces it"
    # The lanes send over the memory network, through their own pools, as Lane wires them.
    for lane in service.app.lanes:
        lane.endpoints = network
        lane.agent = Agent.usingEndpointFactory(clock, network, pool=lane.pool)
        lane.client = HTTPClient(lane.agent)
    service.startService()
    # What ccpd listens with is what it serves: the factory it handed the (memory) reactor.
    [(port, site, _backlog, interface)] = clock.tcpServers
    network.serve(interface, port, site)
    ccpd = MemoryCcpd(service, clock, network, upstream, zai_fake, str(tmp_path / "logs"),
                      url=f"http://{interface}:{port}")
    network.flush()
    return ccpd


def _serve_fake(network: MemoryNetwork, fake: FakeUpstream, url: str) -> FakeUpstream:
    site = Site(fake, reactor=network.clock)
    site.log = lambda request: None
    host = url.split("://", 1)[1]
    network.serve(host, 80, site)
    return fake


@contextmanager
def logged_failures():
    """The log events that carry a traceback, from new-style (``log.failure``) and legacy
    (``twisted.python.log.err``, which Klein uses) loggers alike."""
    events: list[dict] = []

    def observe(event):
        if "log_failure" in event or (event.get("isError") and "failure" in event):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)

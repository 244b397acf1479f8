"""Upstream lanes: where a request goes, which headers it carries there, and the HTTP client
and persistent connection pool each lane owns (closed when the service stops).

Also the readiness probe: a GET of each lane's ``probe_path``, where any answer from 200 to 405
counts as up ("provider policy": an unauthenticated probe that gets 401 still proves the lane
answers). A timer probes every lane each ``probe_interval`` (:class:`ccpd.timers.LaneProber`);
``/readyz`` answers from the latest result, so frequent checks never hammer a provider.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                       TCP6ClientEndpoint, wrapClientTLS)
from twisted.web.client import (URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool,
                                _HTTP11ClientFactory)
from twisted.web._newclient import Request
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer
from treq.client import HTTPClient

from ccpd.config import LaneConfig

log = Logger()

# Hop-by-hop headers (RFC 9110 7.6.1) and those Twisted computes itself per connection.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length",
})
_CLIENT_CREDENTIALS = (b"x-api-key", b"authorization")

PROBE_USER_AGENT = b"ccpd-probe"


class MissingCredential(Exception):
    """A lane whose key comes from an environment variable that is not set."""


def forwardable(headers: Headers, extra_drop: frozenset[bytes] = frozenset()):
    """Yield (name, values) of the end-to-end headers in ``headers``."""
    connection_tokens = {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_tokens or lower in extra_drop:
            continue
        yield name, values


def last_values(headers: Headers, prefix: bytes = b"") -> dict[str, str]:
    """The last value of each header (whose name starts with ``prefix``, lower-case), by
    lower-case name: what the readers of limit answers, usage and utilisation headers take."""
    return {name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in headers.getAllRawHeaders()
            if name.lower().startswith(prefix)}


@dataclass(frozen=True)
class ProbeResult:
    lane: str
    up: bool
    status: int | None
    error: str | None
    checked_at: float
    seconds: float | None = None  # how long the probe took


class Lane:
    """One upstream provider: its URL, its credentials rule and its own connection pool."""

    def __init__(self, config: LaneConfig, reactor, environ: Mapping[str, str] = os.environ):
        self.config = config
        self.name = config.name
        self._reactor = reactor
        self._base = config.base_url.encode("ascii")
        self.api_key: str | None = None
        if config.auth.env_var:
            self.api_key = environ.get(config.auth.env_var) or None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = config.max_connections
        self.pool._factory = _QuietClientFactory
        # The proxy path talks to the pool and its connections' protocol directly (see
        # request): a gateway must not follow redirects, keep cookies or decode gzip the way
        # treq's HTTPClient does for its callers, and needs none of the Agent's per-request
        # URL parsing. The treq client over an Agent on the same pool and endpoints serves
        # ccpd's own calls (the readiness probe).
        self.endpoints = _LaneEndpoints(reactor, config.connect_timeout_s)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)
        self.client = HTTPClient(self.agent)
        self._uri = URI.fromBytes(self._base)
        self._pool_key = (self._uri.scheme, self._uri.host, self._uri.port)
        default_port = {b"http": 80, b"https": 443}.get(self._uri.scheme)
        self._host = (self._uri.host if self._uri.port == default_port else
                      b"%s:%d" % (self._uri.host, self._uri.port))
        self._base_path = self._uri.path.rstrip(b"/")
        self._probe_waiters: list[defer.Deferred] | None = None
        self.last_probe: ProbeResult | None = None

    @property
    def upstream(self) -> str:
        """The lane's base URL, as recorded in usage lines (it never carries credentials)."""
        return self.config.base_url

    def url(self, path_and_query: bytes) -> bytes:
        return self._base + path_and_query

    def request(self, method: bytes, path_and_query: bytes, headers: Headers,
                body: bytes | None) -> defer.Deferred:
        """Send one request on this lane's pool; fires with the response once its headers are
        in (the body is read by whoever receives it). Cancelling it abandons the request.

        ``headers`` become the request's own (its ``Host`` is set here). What the Agent does
        per request is done once per lane (the URL parsed, the endpoint and pool key made);
        the rest is the Agent's own sequence: a connection from the pool, then the request on
        its protocol."""
        # The Agent would check the request line's bytes: ccpd's Guard has (an origin-form
        # target of visible ASCII) and its routes take a fixed set of methods.
        target = self._base_path + path_and_query
        headers.setRawHeaders(b"host", [self._host])
        request = Request(method, target, headers,
                          None if body is None else BytesProducer(body), persistent=True)
        connected = self.pool.getConnection(self._pool_key,
                                            self.endpoints.endpointForURI(self._uri))
        return connected.addCallback(lambda protocol: protocol.request(request))

    def upstream_headers(self, client_headers: Headers) -> Headers:
        """The headers to send upstream: end-to-end client headers plus this lane's credentials.

        ``accept-encoding`` is pinned to identity so that ccpd can read usage from the body
        while passing the very bytes the upstream sent on to the client.
        """
        auth = self.config.auth
        drop = frozenset(_CLIENT_CREDENTIALS) if auth.kind != "passthrough" else frozenset()
        headers = Headers()
        for name, values in forwardable(client_headers, drop | {b"accept-encoding"}):
            headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        if auth.kind != "passthrough":
            headers.setRawHeaders(*self._credential_header())
        return headers

    def credential(self) -> str:
        """The lane's own key; :class:`MissingCredential` when it has none."""
        if self.api_key is None:
            raise MissingCredential(
                f"lane {self.name!r} has no credentials: "
                f"environment variable {self.config.auth.env_var} is not set")
        return self.api_key

    def _credential_header(self) -> tuple[bytes, list[bytes]]:
        key = self.credential().encode("latin-1")
        if self.config.auth.kind == "bearer-env":
            return b"authorization", [b"Bearer " + key]
        return b"x-api-key", [key]

    def probe(self, max_age: float | None = None) -> defer.Deferred:
        """Fire with a :class:`ProbeResult` no older than ``max_age`` seconds (default: the
        lane's ``probe_interval``); concurrent probes are shared."""
        now = self._reactor.seconds()
        if max_age is None:
            max_age = self.config.probe_interval
        if self.last_probe and now - self.last_probe.checked_at < max_age:
            return defer.succeed(self.last_probe)
        waiter: defer.Deferred = defer.Deferred()
        if self._probe_waiters is None:
            self._probe_waiters = [waiter]
            defer.ensureDeferred(self._run_probe())
        else:
            self._probe_waiters.append(waiter)
        return waiter

    async def _run_probe(self) -> None:
        status = error = None
        started = self._reactor.seconds()
        try:
            headers = Headers({b"user-agent": [PROBE_USER_AGENT]})
            if self.config.auth.kind != "passthrough":
                headers.setRawHeaders(*self._credential_header())
            response = await self.client.get(
                self.url(self.config.probe_path.encode("ascii")), headers=headers,
                timeout=self.config.connect_timeout_s, allow_redirects=False)
            status = response.code
            await response.collect(lambda _chunk: None)
        except MissingCredential as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - any failure means "down", reported by kind
            error = describe_failure(e)
        up = status is not None and 200 <= status <= 405
        if not up and error is None:
            error = f"probe answered HTTP {status}"
        now = self._reactor.seconds()
        result = ProbeResult(self.name, up, status, error, now, round(now - started, 6))
        if self.last_probe is None or self.last_probe.up != up:
            log.info("lane {lane} is {state} ({detail})", lane=self.name,
                     state="up" if up else "down", detail=error or f"HTTP {status}")
        self.last_probe = result
        waiters, self._probe_waiters = self._probe_waiters or [], None
        for waiter in waiters:
            waiter.callback(result)

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()


@implementer(IAgentEndpointFactory)
class _LaneEndpoints:
    """A lane's endpoints, made once per host: the stock factory builds (and IDNA-encodes) a
    new one for every request, a measurable share of a proxied request's CPU time."""

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = _endpoint_for(self._reactor, uri.host, uri.port, self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port),
                                         endpoint)
            self._endpoints[key] = endpoint
        return endpoint


def _endpoint_for(reactor, host: bytes, port: int, timeout: float):
    """A TCP endpoint for ``host``: an IP address is connected to as it is, a name through
    ``HostnameEndpoint``, which resolves it on the reactor's thread pool (ten threads) for
    every new connection; a burst of streams to a loopback or LAN lane by address would queue
    there for nothing."""
    name = host.decode("ascii")
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    endpoint = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    return endpoint(reactor, str(address), port, timeout=timeout)


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every new upstream connection."""

    noisy = False


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go (with its content-length)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer) -> defer.Deferred:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def describe_failure(error: BaseException) -> str:
    """A short, credential-free description of why an upstream request failed."""
    reasons = getattr(error, "reasons", None)  # ResponseFailed / RequestTransmissionFailed
    if reasons:
        error = reasons[0].value
    if isinstance(error, defer.CancelledError):
        return "timed out"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


class Lanes(service.Service):
    """All configured lanes; closes their connection pools on stop. Every probe result goes
    to the ``ccp_lane_up`` and ``ccp_lane_probe_seconds`` gauges (when ``metrics`` is given)."""

    name = "lanes"

    def __init__(self, configs: Mapping[str, LaneConfig], reactor,
                 environ: Mapping[str, str] = os.environ, metrics=None):
        self.by_name = {name: Lane(cfg, reactor, environ) for name, cfg in configs.items()}
        self.metrics = metrics

    def probe(self, lane: Lane, max_age: float | None = None) -> defer.Deferred:
        """:meth:`Lane.probe`, its result shown on the gauges."""
        return lane.probe(max_age).addCallback(self._show)

    def probe_all(self) -> defer.Deferred:
        """Every lane's result no older than its ``probe_interval``, in lane order."""
        return defer.gatherResults([self.probe(lane) for lane in self])

    def _show(self, result: ProbeResult) -> ProbeResult:
        if self.metrics is not None:
            self.metrics.lane_up.labels(result.lane).set(1 if result.up else 0)
            if result.seconds is not None:
                self.metrics.lane_probe_seconds.labels(result.lane).set(result.seconds)
        return result

    def __getitem__(self, name: str) -> Lane:
        return self.by_name[name]

    def __iter__(self):
        return iter(self.by_name.values())

    def startService(self):
        super().startService()
        for lane in self:
            if lane.config.auth.env_var and lane.api_key is None:
                log.warn("lane {lane}: environment variable {var} is not set; requests routed "
                         "to this lane will fail with 502", lane=lane.name,
                         var=lane.config.auth.env_var)

    def stopService(self):
        super().stopService()
        return defer.DeferredList([lane.close() for lane in self])

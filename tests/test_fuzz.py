"""Fuzzing ccpd's edges with hypothesis: the request path, HTTP framing, config and quotas.

Whatever a client sends, ccpd answers over HTTP (in Anthropic's error shape when it refuses)
or sends the request on to a lane, never both, never a 500 or a logged traceback, and never
an upstream request for what its guard must refuse. Whatever an operator writes in the config
or the quotas file, ccpd starts or stops with one clean error that names the place.

The oracles here are deliberately simpler than ccpd's rules (a Host that names neither
loopback nor an allowed host is foreign; a request that carries no client token lacks one),
so they can be wrong only in the safe direction: they leave some cases undecided, never
decide one against the rules. Inputs that once hit a bug are kept as explicit examples on
the tests at the end of each part (the fuzzer found each of them).
"""
from __future__ import annotations

import json
import re
import string
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from ccpd.config import Config, ConfigError, config_from_string, load_config
from ccpd.lanes import BytesProducer
from ccpd.quotas import ModelQuota, QuotaError, load_quotas, parse_quotas
from ccpd.store import service as store_service
from ccpd.tap import build_service
from ccpd.web.site import MAX_HEADER_BYTES, CcpdSite
from tests.support import MemoryNetwork, SynchronousStore, ccpd_ini, logged_failures

PORT = 8787                      # where the fuzzed ccpd listens
LANE_URL = "http://upstream.invalid"  # both lanes of the test config (zai under /api/anthropic)
LANE_PORT = 80
LANE_HOST = b"upstream.invalid"
TOKEN = "fuzz-client-token-0123456789abcdef"
ALLOWED_HOST = "ccpd.lan"
ALLOWED_ORIGIN = "https://tool.example"
MAX_BODY = 65536                 # [server] max_body_bytes of the test config

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
# The regression tests run their @example inputs only (the strategy in @given is never drawn).
EXPLICIT = settings(phases=[Phase.explicit], deadline=None)


def describe(events: list[dict]) -> str:
    failures = [event.get("log_failure") or event.get("failure") for event in events]
    return "\n".join(failure.getTraceback() for failure in failures)


# == 1. the request path ==========================================================================
#
# ccpd is started on a MemoryReactorClock (its store on the calling thread) and its own site is
# served on an in-memory network, so requests go through CcpdSite, the guard and Klein exactly as
# on a socket. The lanes keep their real endpoints on that clock: a request that goes on to a
# lane shows up as a connection attempt in ``clock.tcpClients``, which the test may then complete
# on a StringTransport to read what ccpd sent upstream.

@dataclass(frozen=True)
class FuzzConfig:
    client_token: bool
    allowed_host: bool
    allowed_origin: bool

    def server_extra(self) -> str:
        lines = []
        if self.client_token:
            lines.append(f"client_tokens = {TOKEN}")
        if self.allowed_host:
            lines.append(f"allowed_hosts = {ALLOWED_HOST}")
        if self.allowed_origin:
            lines.append(f"allowed_origins = {ALLOWED_ORIGIN}")
        return "\n".join(lines)


@dataclass
class FuzzedCcpd:
    service: object
    clock: MemoryReactorClock
    network: MemoryNetwork
    agent: Agent


@contextmanager
def memory_ccpd(config: FuzzConfig):
    """ccpd built and started as ``twistd`` would, in memory; stopped (all but its requests in
    flight, which a memory reactor leaves hanging harmlessly) when the block ends."""
    with tempfile.TemporaryDirectory() as tmp:
        text = ccpd_ini(Path(tmp), LANE_URL,
                        server_extra=config.server_extra(), store_extra="persist = false",
                        listen=f"tcp:{PORT}:interface=127.0.0.1")
        clock = MemoryReactorClock()
        with mock.patch.object(store_service, "SQLiteStore", SynchronousStore):
            service = build_service(config_from_string(text, source="fuzz.ini", environ={}),
                                    clock, {"ZAI_TEST_KEY": "zai-secret-key-123"})
        service.startService()
        # The lanes' readiness probes at start are answered (up), so that /readyz answers
        # from their results as in a daemon instead of waiting for them.
        for host, port, factory, _timeout, _bind in clock.tcpClients:
            probe = factory.buildProtocol(IPv4Address("TCP", host, port))
            probe.makeConnection(StringTransport())
            probe.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        clock.advance(0)
        [(port, site, _backlog, interface)] = clock.tcpServers
        network = MemoryNetwork(clock)
        network.serve(interface, port, site)
        agent = Agent.usingEndpointFactory(clock, network,
                                           pool=HTTPConnectionPool(clock, persistent=False))
        try:
            yield FuzzedCcpd(service, clock, network, agent)
        finally:
            for child in reversed(list(service)):
                if child.running:
                    child.stopService()
            network.flush()


class _Collect(Protocol):
    def __init__(self, done: defer.Deferred):
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


@dataclass
class Answer:
    code: int
    headers: Headers
    body: bytes


@dataclass
class Outcome:
    """What became of one request: ccpd's answer (None while it waits on a lane), the bytes
    sent upstream on each connection it opened, and a client-side failure if any."""

    answer: Answer | None
    upstream: list[tuple[int, bytes]]
    failure: object = None


def exchange(ccpd: FuzzedCcpd, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
             body: bytes | None) -> Outcome:
    raw = Headers()
    for name, value in headers:
        raw.addRawHeader(name, value)
    attempts_before = len(ccpd.clock.tcpClients)
    results: list = []

    async def whole():
        response = await ccpd.agent.request(method, f"http://127.0.0.1:{PORT}".encode() + target,
                                            raw, None if body is None else BytesProducer(body))
        done: defer.Deferred = defer.Deferred()
        response.deliverBody(_Collect(done))
        return Answer(response.code, response.headers, await done)

    defer.ensureDeferred(whole()).addBoth(results.append)
    ccpd.network.flush()
    upstream = []
    for host, port, factory, _timeout, _bind in ccpd.clock.tcpClients[attempts_before:]:
        # Let the connection succeed, so that ccpd writes the request it meant to send.
        transport = StringTransport()
        factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(transport)
        ccpd.clock.advance(0)
        upstream.append((port, transport.value()))
    answer = results[0] if results else None
    if answer is not None and not isinstance(answer, Answer):
        return Outcome(None, upstream, answer)
    return Outcome(answer, upstream)


# -- strategies ------------------------------------------------------------------------------------

_TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_HEADER_VALUE_BYTES = [9] + list(range(0x20, 0x7F)) + list(range(0x80, 0x100))
# Headers ccpd's checks or HTTP's framing are about: drawn by their own strategies (framing in
# part 2), never as random names.
_RESERVED = {"host", "origin", "x-api-key", "authorization", "content-length", "content-type",
             "transfer-encoding", "connection", "expect", "te", "trailer", "upgrade",
             "keep-alive", "proxy-connection"}

# Weighted towards what reaches ccpd's routes and lanes: most draws are an own client's.
methods = st.one_of(
    st.sampled_from([b"POST", b"GET"]),
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"PATCH", b"DELETE", b"OPTIONS",
                     b"TRACE", b"CONNECT", b"post", b"Get"]),
    st.text(_TCHAR, min_size=1, max_size=10).map(str.encode))

ROUTES = ["/v1/messages", "/v1/messages/count_tokens", "/v1/usage", "/v1/usage/samples",
          "/v1/usage/rollups", "/v1/usage/sim", "/v1/quotas", "/v1/quotas/reload", "/metrics",
          "/readyz", "/healthz", "/", "/v1", "/v1/", "/v1/models", "/v1/messages/batches",
          "/v1/messages/", "/healthz/", "/HEALTHZ", "/v1/../healthz", "/v1/./messages"]
_PCHAR = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
percent_escapes = st.integers(0x00, 0x7F).map(lambda byte: f"%{byte:02X}")
segments = st.lists(st.one_of(st.text(_PCHAR, min_size=1, max_size=8), percent_escapes,
                              st.sampled_from(["..", ".", "%2F", "%2e%2e", "%C3%A9",
                                               "%E2%82%AC", "%F0%9F%98%80", "%FF", "%C3%28"])),
                    min_size=1, max_size=4).map("".join)
paths = st.one_of(
    st.sampled_from(ROUTES),
    st.sampled_from(ROUTES),
    st.lists(segments, min_size=1, max_size=4).map(lambda parts: "/v1/" + "/".join(parts)),
    st.lists(segments, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)))
query_values = st.one_of(
    st.sampled_from(["", "0", "1", "-1", "nan", "inf", "-inf", "1e309", "10001", "hour", "day",
                     "week", "9" * 400, "%FF%FE", "%C3%A9", "%00", "glm-4.6"]),
    st.lists(st.one_of(st.text(_PCHAR.replace("&", "").replace("=", ""), max_size=6),
                       percent_escapes), max_size=4).map("".join))
queries = st.one_of(
    st.just(""),
    st.lists(st.tuples(st.sampled_from(["since", "limit", "model", "granularity", "x", "", "%FF"]),
                       query_values), max_size=4)
    .map(lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs)),
    st.text(_PCHAR + "/?%", max_size=20).map(lambda q: "?" + q))
targets = st.tuples(paths, queries).map(lambda pq: (pq[0] + pq[1]).encode("ascii"))

header_names = st.text(_TCHAR, min_size=1, max_size=16).filter(
    lambda name: name.lower() not in _RESERVED)
header_values = st.lists(st.sampled_from(_HEADER_VALUE_BYTES), max_size=40).map(bytes).map(
    bytes.strip)

# (value, kind): "own" must be served, "foreign" refused, "unknown" may be either.
_OWN_HOSTS = [f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"LocalHost:{PORT}", f"[::1]:{PORT}",
              f"localhost.:{PORT}", f"127.0.0.2:{PORT}", f"app.localhost:{PORT}"]
_FOREIGN_HOSTS = [f"attacker.example:{PORT}", "attacker.example", "127.0.0.1:9999", "localhost",
                  "127.0.0.1", f"127.0.0.1.nip.io:{PORT}", f"localhost.attacker.example:{PORT}",
                  f"10.0.0.8:{PORT}", "", f"[::2]:{PORT}", f"0.0.0.0:{PORT}"]
_DNS = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){0,2}\Z").filter(
    lambda name: "localhost" not in name and name != ALLOWED_HOST)
_LOOPBACK_MARKERS = (b"127.", b"localhost", b"[", b"::", b"0:0", ALLOWED_HOST.encode())


def _garbage_host_kind(value: bytes) -> str:
    lowered = value.lower()
    return "unknown" if any(marker in lowered for marker in _LOOPBACK_MARKERS) else "foreign"


own_hosts = st.one_of(
    st.sampled_from(_OWN_HOSTS).map(lambda h: (h.encode(), "own")),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)).map(
        lambda abc: (f"127.{abc[0]}.{abc[1]}.{abc[2]}:{PORT}".encode(), "own")),
    st.from_regex(r"\A[a-z0-9-]{1,10}\Z").map(lambda n: (f"{n}.localhost:{PORT}".encode(), "own")))
other_hosts = st.one_of(
    st.sampled_from([f"{ALLOWED_HOST}:{PORT}", ALLOWED_HOST, f"{ALLOWED_HOST}:1"]).map(
        lambda h: (h.encode(), "allowed")),
    st.sampled_from(_FOREIGN_HOSTS).map(lambda h: (h.encode(), "foreign")),
    st.tuples(_DNS, st.sampled_from(["", f":{PORT}", ":80", ":443", ":1"])).map(
        lambda np: ((np[0] + np[1]).encode(), "foreign")),
    st.tuples(st.integers(1, 223).filter(lambda a: a != 127), st.integers(0, 255),
              st.integers(0, 255), st.integers(1, 254)).map(
        lambda ip: ("{}.{}.{}.{}:{}".format(*ip, PORT).encode(), "foreign")),
    st.integers(1, 65535).filter(lambda p: p != PORT).map(
        lambda p: (f"127.0.0.1:{p}".encode(), "foreign")),
    header_values.map(lambda v: (v, _garbage_host_kind(v))))
# (map() keeps one_of from flattening the branches, which would undo the weights)
hosts = st.one_of(own_hosts.map(tuple), own_hosts.map(tuple), other_hosts.map(tuple))

_FOREIGN_ORIGINS = ["https://attacker.example", "null", f"http://localhost:{PORT + 1}",
                    "http://127.0.0.1:8788", "file://", "chrome-extension://abcdef",
                    f"https://127.0.0.1:{PORT}.attacker.example", "https://tool.example.evil"]
# (value or None, kind); "own" is the request's own Host, filled in by the request strategy.
origins = st.one_of(
    st.just((None, "none")),
    st.just((None, "none")),
    st.just((None, "none")),
    st.sampled_from(["http://{host}", "HTTP://{host}/", "https://{host}"]).map(
        lambda o: (o, "own")),
    st.sampled_from([ALLOWED_ORIGIN, ALLOWED_ORIGIN.upper() + "/"]).map(
        lambda o: (o, "allowed")),
    st.sampled_from(_FOREIGN_ORIGINS).map(lambda o: (o.encode(), "foreign")),
    header_values.map(lambda v: (v, "unknown" if v.strip().lower().startswith((b"http", b"null"))
                                 else "foreign")))

content_types = st.one_of(
    st.none(),
    st.sampled_from([b"application/json", b"application/json; charset=utf-8", b"text/plain",
                     b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
                     b"multipart/form-data", b"text/event-stream", b"application/JSON", b""]),
    header_values)
api_keys = st.one_of(st.none(), st.just(TOKEN.encode()),
                     st.sampled_from([b"wrong-token-0123456789abcdef", TOKEN[:-1].encode(), b""]),
                     header_values)
authorizations = st.one_of(
    st.none(),
    st.sampled_from([b"Bearer " + TOKEN.encode(), b"bearer " + TOKEN.encode(),
                     b"Bearer  " + TOKEN.encode(), b"Basic " + TOKEN.encode(), b"Bearer ",
                     b"Bearer wrong-token-0123456789abcdef", b"Bearer sk-ant-oauth-of-the-user"]),
    header_values)

# -- bodies: (kind, bytes or None) --
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                          st.text(max_size=20))
json_values = st.recursive(_JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
models = st.one_of(st.sampled_from(["glm-4.6", "glm-solo", "claude-sonnet-4-5", "claude-x", ""]),
                   json_values)
messages_documents = st.fixed_dictionaries(
    {"model": models},
    optional={"max_tokens": st.one_of(st.integers(-1, 10**6), json_values),
              "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), json_values),
              "stream": st.one_of(st.booleans(), st.sampled_from(["true", 1, 0, None, [], {}]),
                                  json_values),
              "system": json_values})


def _nested(depth_and_kinds) -> bytes:
    depth, objects = depth_and_kinds
    opener, closer = (b'{"a":', b"}") if objects else (b"[", b"]")
    return opener * depth + b"1" + closer * depth


bodies = st.one_of(
    st.just(("none", None)),
    messages_documents.map(lambda doc: ("messages", json.dumps(doc).encode())),  # twice: weight
    st.just(("empty", b"")),
    messages_documents.map(lambda doc: ("messages", json.dumps(doc).encode())),
    json_values.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: ("non_object", json.dumps(v).encode())),
    messages_documents.flatmap(lambda doc: st.integers(0, len(json.dumps(doc)) - 1).map(
        lambda cut: ("truncated", json.dumps(doc).encode()[:cut]))),
    st.binary(max_size=200).map(lambda b: ("random", b)),
    st.binary(max_size=50).map(lambda b: ("non_utf8", b'{"model": "' + b + b'\xff\xfe"}')),
    st.sampled_from([b"1e999", b"-1e999", b"9" * 4400, b"0." + b"0" * 500 + b"1"]).map(
        lambda n: ("huge_number", b'{"model": "claude-x", "max_tokens": ' + n + b"}")),
    st.tuples(st.integers(1, 950), st.booleans()).map(lambda d: (f"nested:{d[0]}", _nested(d))),
    st.just(("oversize", b'{"model": "claude-x", "pad": "' + b"x" * MAX_BODY + b'"}')))


@dataclass
class FuzzRequest:
    method: bytes
    target: bytes
    host: bytes
    host_kind: str
    origin: bytes | None
    origin_kind: str
    headers: list[tuple[bytes, bytes]]
    body_kind: str
    body: bytes | None
    credential_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def all_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"host", self.host)]
        if self.origin is not None:
            headers.append((b"origin", self.origin))
        return headers + self.credential_headers + self.headers


@st.composite
def requests(draw, config: FuzzConfig):
    """Half are from an own client (own Host, no Origin, its token), whose requests reach the
    routes and the lanes; the other half mix every kind of Host, Origin and credential."""
    own_client = draw(st.booleans())
    host, host_kind = draw(own_hosts if own_client else hosts)
    if host_kind == "allowed":
        # ccpd.lan:1 names an allowed host: allowed_hosts entries without a port take any port
        host_kind = "own" if config.allowed_host else "foreign"
    origin, origin_kind = (None, "none") if own_client else draw(origins)
    if origin_kind == "own":
        origin = origin.format(host=host.decode("latin-1")).encode("latin-1")
    elif origin_kind == "allowed":
        origin = origin.encode()
        origin_kind = "own" if config.allowed_origin else "foreign"
    credentials = []
    key = TOKEN.encode() if own_client and config.client_token else draw(api_keys)
    if key is not None:
        credentials.append((b"x-api-key", key))
    if (authorization := draw(authorizations)) is not None:
        credentials.append((b"authorization", authorization))
    headers = []
    if (content_type := draw(content_types)) is not None:
        headers.append((b"content-type", content_type))
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=4)):
        headers.append((name.encode(), value))
    body_kind, body = draw(bodies)
    return FuzzRequest(draw(methods), draw(targets), host, host_kind, origin, origin_kind,
                       headers, body_kind, body, credentials)


configs = st.builds(FuzzConfig, st.booleans(), st.booleans(), st.booleans())


# -- the oracle ----------------------------------------------------------------------------------

def lacks_token(config: FuzzConfig, request: FuzzRequest) -> bool:
    """A token is configured and the request carries it nowhere at all."""
    return config.client_token and not any(TOKEN.encode() in value
                                           for _name, value in request.all_headers())


def token_only_in_accepted_forms(request: FuzzRequest) -> bool:
    """The client token appears only as ``x-api-key: T`` or ``Authorization: Bearer T``."""
    for name, value in request.all_headers():
        if TOKEN.encode() not in value:
            continue
        scheme, _, credential = value.partition(b" ")
        accepted = (name == b"x-api-key" and value == TOKEN.encode()) or (
            name == b"authorization" and scheme.lower() == b"bearer"
            and credential.strip() == TOKEN.encode())
        if not accepted:
            return False
    return True


def path_info(target: bytes) -> bytes:
    """The path a router sees: percent-decoded, query cut off."""
    return unquote_to_bytes(target.split(b"?", 1)[0])


def upstream_host(sent: bytes) -> bytes | None:
    """The Host of a request ccpd sent upstream (None when it sent nothing yet)."""
    head = sent.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    hosts = [line.split(b":", 1)[1].strip() for line in head[1:]
             if line.lower().startswith(b"host:")]
    return hosts[0] if len(hosts) == 1 else None if not sent else b"<%d Host headers>" % len(hosts)


def is_error_shape(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return (isinstance(document, dict) and document.get("type") == "error"
            and isinstance(document.get("error"), dict)
            and isinstance(document["error"].get("type"), str)
            and isinstance(document["error"].get("message"), str))


def check_request(config: FuzzConfig, request: FuzzRequest) -> Outcome:
    with logged_failures() as failures, memory_ccpd(config) as ccpd:
        outcome = exchange(ccpd, request.method, request.target, request.all_headers(),
                           request.body)
    assert not failures, describe(failures)
    assert outcome.failure is None, f"the client got no HTTP answer: {outcome.failure}"
    answered, forwarded = outcome.answer is not None, bool(outcome.upstream)
    assert answered != forwarded, (
        f"answered: {answered}, upstream connections: {len(outcome.upstream)} (exactly one "
        f"of the two, always)")

    answer = outcome.answer
    if answered:
        assert 100 <= answer.code < 600 and answer.code != 500, (answer.code, answer.body)
        if answer.code >= 400 and request.method != b"HEAD":
            assert is_error_shape(answer.body), (answer.code, answer.body)

    # The refusals: none of these may reach a lane, and each gets its own status. /healthz is
    # the one path open without a client token (liveness checks), and it never reaches a lane.
    refused_host = request.host_kind == "foreign"
    refused_origin = request.origin_kind == "foreign"
    refused_token = lacks_token(config, request)
    if refused_host or refused_origin or refused_token:
        assert not forwarded, "a request ccpd must refuse went on to a lane"
    host_ok = request.host_kind == "own"
    if refused_host:
        assert answer.code == 421
    elif refused_origin:
        assert answer.code == 403 if host_ok else answer.code in (421, 403)
    elif refused_token and path_info(request.target) != b"/healthz":
        if host_ok and request.origin_kind in ("none", "own"):
            assert answer.code == 401
        else:
            assert answer.code in (421, 403, 401)

    # Nothing to refuse: a well-formed Messages request from an own client goes on to a lane.
    if (request.host_kind == "own" and request.origin_kind in ("none", "own")
            and (not config.client_token or (b"x-api-key", TOKEN.encode())
                 in request.credential_headers)
            and request.method == b"POST" and path_info(request.target) == b"/v1/messages"
            and request.body_kind == "messages" and isinstance(json.loads(request.body)["model"],
                                                               str)):
        assert forwarded, (outcome.answer.code, outcome.answer.body)

    for port, sent in outcome.upstream:
        assert port == LANE_PORT
        assert upstream_host(sent) in (None, LANE_HOST), sent
        # A client token sent the way ccpd takes it never reaches a lane (sent in both
        # credential headers it does: see test_a_token_in_both_credential_headers_...).
        in_both = sum(TOKEN.encode() in value for _name, value in request.credential_headers) > 1
        if config.client_token and token_only_in_accepted_forms(request) and not in_both:
            assert TOKEN.encode() not in sent, sent
    return outcome


@FUZZ
@given(config=configs, data=st.data())
def test_every_request_is_answered_or_forwarded_and_refusals_never_reach_a_lane(config, data):
    request = data.draw(requests(config))
    outcome = check_request(config, request)
    event("forwarded" if outcome.upstream else f"answered {outcome.answer.code}")


CLEAN = FuzzConfig(client_token=False, allowed_host=False, allowed_origin=False)
WITH_TOKEN = FuzzConfig(client_token=True, allowed_host=False, allowed_origin=False)


def own_request(method=b"POST", target=b"/v1/messages", body_kind="messages", body=None,
                host=f"127.0.0.1:{PORT}".encode(), credentials=()) -> FuzzRequest:
    if body is None:
        body = json.dumps({"model": "claude-x", "max_tokens": 1, "messages": []}).encode()
    return FuzzRequest(method, target, host, "own", None, "none",
                       [(b"content-type", b"application/json")], body_kind, body,
                       list(credentials))


@EXPLICIT
@example(request=own_request(body_kind="nested:5000", body=_nested((5000, False))))
@example(request=own_request(target=b"/v1/messages/count_tokens", body_kind="nested:1000",
                             body=_nested((1000, True))))
@example(request=own_request(target=b"/v1/usage/sim", body_kind="nested:2000",
                             body=_nested((2000, False))))
@given(request=requests(CLEAN))
def test_deeply_nested_json_bodies_get_a_400(request):
    check_request(CLEAN, request)


@EXPLICIT
@example(request=own_request(target=b"/v1//messages"))
@example(request=own_request(method=b"GET", target=b"/v1//usage", body=b""))
@example(request=own_request(target=b"/v1/%2Fmessages"))
@given(request=requests(CLEAN))
def test_paths_with_empty_segments_get_no_500(request):
    check_request(CLEAN, request)


@EXPLICIT
@example(request=own_request(method=b"GET", target=b"/v1/%FF", body=b""))
@example(request=own_request(target=b"/%C3%28"))
@example(request=own_request(method=b"GET", target=b"/healthz", body=b"",
                             host=b"\xe9.localhost:8787"))
@given(request=requests(CLEAN))
def test_non_utf8_urls_get_an_anthropic_shaped_400(request):
    check_request(CLEAN, request)


@EXPLICIT
@example(request=own_request(credentials=[(b"x-api-key", TOKEN.encode()),
                                          (b"authorization", b"Bearer " + TOKEN.encode())]))
@given(request=requests(WITH_TOKEN))
def test_a_token_in_both_credential_headers_never_reaches_the_lane(request):
    with memory_ccpd(WITH_TOKEN) as ccpd:
        outcome = exchange(ccpd, request.method, request.target, request.all_headers(),
                           request.body)
    [(_port, sent)] = outcome.upstream
    assert TOKEN.encode() not in sent, sent


# == 2. raw HTTP framing ==========================================================================
#
# Bytes straight into CcpdSite's channel, over a recording resource: which requests got through
# the framing, and what the channel wrote back.

class Recording(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes]] = []

    def render(self, request):
        self.seen.append((request.method, request.uri, request.content.read()))
        return b"ok"


def feed(data: bytes, cuts: list[int] = ()) -> tuple[bytes, list]:
    """Feed ``data`` to a fresh ccpd channel in pieces cut at ``cuts``; what it wrote back and
    the requests that reached the resource. The channel may never raise."""
    recording = Recording()
    site = CcpdSite(recording, max_body_bytes=1000, header_timeout=30.0,
                    reactor=MemoryReactorClock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", PORT),
                                peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if transport.disconnecting:
            break  # a transport stops reading once the protocol closed it
        if cut > start:
            channel.dataReceived(data[start:cut])
            start = cut
    return transport.value(), recording.seen


_STATUS_LINE = re.compile(rb"\AHTTP/1\.1 [1-5][0-9][0-9] ")
_DATE = re.compile(rb"\r\nDate: [^\r]*")  # Twisted dates answers by the wall clock


@dataclass
class RawRequest:
    """A request's bytes and what must become of it: ``valid`` (served once, with its body),
    ``invalid`` (a 400, never served), ``incomplete`` (nothing yet), ``too_large`` (ccpd's 431),
    ``unknown`` (an answer or nothing, but never a raise)."""

    request_line: bytes
    headers: list[bytes]
    body: bytes
    expect: str
    mangled: bytes | None = None  # bytes that no longer split into line, headers and body

    def bytes(self) -> bytes:
        if self.mangled is not None:
            return self.mangled
        return self.request_line + b"\r\n" + b"".join(h + b"\r\n" for h in self.headers) + \
            b"\r\n" + self.body


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, position = b"", 0
    for size in sizes + [len(body)]:
        piece = body[position:position + size]
        if piece:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
            position += len(piece)
    return out + b"0\r\n\r\n"


@st.composite
def valid_raw_requests(draw) -> tuple[RawRequest, bytes]:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]))
    target = draw(targets)
    body = draw(st.binary(max_size=64))
    headers = [b"Host: 127.0.0.1:%d" % PORT]
    headers += [name.encode() + b": " + value
                for name, value in draw(st.lists(st.tuples(header_names, header_values),
                                                 max_size=3))]
    if draw(st.booleans()):
        headers.append(b"Transfer-Encoding: chunked")
        framed = _chunked(body, draw(st.lists(st.integers(1, 16), max_size=4)))
    else:
        headers.append(b"Content-Length: %d" % len(body))
        framed = body
    return RawRequest(method + b" " + target + b" HTTP/1.1", headers, framed, "valid"), body


def _replace_framing(raw: RawRequest, headers: list[bytes], body: bytes, expect: str):
    kept = [h for h in raw.headers if not h.lower().startswith((b"content-length:",
                                                                 b"transfer-encoding:"))]
    return RawRequest(raw.request_line, kept + headers, body, expect)


@st.composite
def mutated_raw_requests(draw):
    raw, body = draw(valid_raw_requests())
    kind = draw(st.sampled_from(
        ["none", "dup_length", "bad_length", "te_not_chunked_last", "te_and_length",
         "bad_chunk_size", "no_colon", "space_before_colon", "bad_request_line", "crlf",
         "truncated", "huge_headers", "identity", "obs_fold", "control_char"]))
    if kind == "none":
        return raw, body
    if kind == "dup_length":
        other = draw(st.integers(0, 100).filter(lambda n: n != len(body)))
        first, second = draw(st.permutations([len(body), other]))
        return _replace_framing(raw, [b"Content-Length: %d" % first,
                                      b"Content-Length: %d" % second], body, "invalid"), body
    if kind == "bad_length":
        value = draw(st.one_of(
            st.sampled_from([b"-1", b"+3", b"0x10", b"1.5", b"", b"3 3", b"3, 3", b"abc",
                             "\u00b3".encode()]),
            st.from_regex(rb"\A[^0-9\r\n]{1,6}\Z")))
        return _replace_framing(raw, [b"Content-Length: " + value], body, "invalid"), body
    if kind == "te_not_chunked_last":
        coding = draw(st.sampled_from([b"gzip", b"chunked, gzip", b"xchunked", b"chunkedx",
                                       b"compress", b"deflate", b"chunked chunked"]))
        return _replace_framing(raw, [b"Transfer-Encoding: " + coding],
                                _chunked(body, []), "invalid"), body
    if kind == "te_and_length":
        return _replace_framing(raw, [b"Transfer-Encoding: chunked",
                                      b"Content-Length: %d" % len(body)],
                                _chunked(body, []), "invalid"), body
    if kind == "bad_chunk_size":
        size = draw(st.sampled_from([b"zz", b"-3", b"0x3", b"+3", b"", b"g", b" 3"]))
        return _replace_framing(raw, [b"Transfer-Encoding: chunked"],
                                size + b"\r\n" + body + b"\r\n0\r\n\r\n", "invalid"), body
    if kind == "no_colon":
        # (a line that starts with whitespace would be an obs-fold continuation instead)
        line = draw(st.from_regex(rb"\A[A-Za-z0-9-][A-Za-z0-9 -]{0,19}\Z"))
        return RawRequest(raw.request_line, raw.headers[:1] + [line] + raw.headers[1:],
                          raw.body, "invalid"), body
    if kind == "space_before_colon":
        return RawRequest(raw.request_line, raw.headers + [b"X-Fuzz : 1"], raw.body,
                          "invalid"), body
    if kind == "bad_request_line":
        method, target, _version = raw.request_line.split(b" ")
        line = draw(st.sampled_from([method + b" " + target, method + b" " + target + b" HTTP/x",
                                     method + b" " + target + b" HTTP/1.1 extra",
                                     method + b" " + target + b" http/1.1",
                                     b"G(T " + target + b" HTTP/1.1", b"", target]))
        return RawRequest(line, raw.headers, raw.body, "invalid"), body
    if kind == "truncated":
        data = raw.bytes()
        cut = draw(st.integers(0, len(data) - 1))
        return RawRequest(b"", [], b"", "incomplete", mangled=data[:cut]), body
    if kind == "huge_headers":
        return RawRequest(raw.request_line,
                          raw.headers + [b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 10)], raw.body,
                          "too_large"), body
    if kind == "crlf":
        data = bytearray(raw.bytes())
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data)))
            data[position:position] = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n"]))
        return RawRequest(b"", [], b"", "unknown", mangled=bytes(data)), body
    if kind == "identity":  # Twisted reads no body for it (RFC 9112 says 400); undecided here
        return _replace_framing(raw, [b"Transfer-Encoding: identity"], raw.body, "unknown"), body
    if kind == "obs_fold":  # RFC 9112: reject, or unfold into a space; either is fine
        return RawRequest(raw.request_line, raw.headers[:1] + [b"X-Fold: a", b" b"] +
                          raw.headers[1:], raw.body, "unknown"), body
    char = draw(st.sampled_from([b"\x00", b"\r", b"\x7f", b"\x0b"]))  # control_char
    return RawRequest(raw.request_line, raw.headers + [b"X-Ctl: a" + char + b"b"], raw.body,
                      "unknown"), body


@FUZZ
@given(mutated=mutated_raw_requests(), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_the_channel_answers_bad_framing_without_serving_it(mutated, cuts):
    raw, body = mutated
    data = raw.bytes()
    with logged_failures() as failures:
        written, seen = feed(data, cuts)
    assert not failures, describe(failures)
    if written:
        assert _STATUS_LINE.match(written), written[:80]
    if raw.expect == "valid":
        [(_method, _uri, received)] = seen
        assert received == body
        assert written.startswith(b"HTTP/1.1 200 ")
    elif raw.expect == "invalid":
        assert seen == [], "a request with invalid framing reached the resource"
        assert written.startswith(b"HTTP/1.1 400 "), written[:80]
    elif raw.expect == "incomplete":
        assert seen == [] and written == b""
    elif raw.expect == "too_large":
        assert seen == []
        assert written.startswith(b"HTTP/1.1 431 ")
        assert is_error_shape(written.split(b"\r\n\r\n", 1)[1])
    # Where the request ends does not depend on how the bytes were cut.
    whole, seen_whole = feed(data)
    assert (_DATE.sub(b"", written), seen) == (_DATE.sub(b"", whole), seen_whole)


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=6))
def test_random_bytes_never_break_the_channel(data, cuts):
    with logged_failures() as failures:
        written, _seen = feed(data, cuts)
    assert not failures, describe(failures)
    if written:
        assert _STATUS_LINE.match(written), written[:80]


# A request-target that is not origin-form ("x/v1/messages") still reaches ccpd's routes (Twisted
# drops its first character when splitting the path) and is then appended to the lane's base URL.

def raw_to_ccpd(config: FuzzConfig, data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    with logged_failures() as failures, memory_ccpd(config) as ccpd:
        [(_port, site, _backlog, _interface)] = ccpd.clock.tcpServers
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", PORT),
                                    peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        probes = len(ccpd.clock.tcpClients)  # the lanes' readiness probes at start
        channel.dataReceived(data)
        ccpd.clock.advance(0)
        upstream = []
        for host, port, factory, _timeout, _bind in ccpd.clock.tcpClients[probes:]:
            sent = StringTransport()
            factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(sent)
            ccpd.clock.advance(0)
            upstream.append((port, sent.value()))
    assert not failures, describe(failures)
    return transport.value(), upstream


request_targets = st.one_of(
    targets,
    st.tuples(st.sampled_from(string.ascii_letters + string.digits + "@.:-_~"),
              st.sampled_from(["/v1/messages", "/v1/models"])).map(lambda t: "".join(t).encode()),
    st.sampled_from([b"http://evil.example/v1/messages", b"*",
                     b"http://127.0.0.1:%d/v1/messages" % PORT]))


def post_target(target: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    body = json.dumps({"model": "claude-x", "max_tokens": 1, "messages": []}).encode()
    return raw_to_ccpd(CLEAN, b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:%d"
                       b"\r\nContent-Length: %d\r\n\r\n" % (PORT, len(body)) + body)


def check_target(target: bytes) -> None:
    written, upstream = post_target(target)
    assert bool(written) != bool(upstream)
    if written:
        assert _STATUS_LINE.match(written) and not written.startswith(b"HTTP/1.1 500 ")
    for port, sent in upstream:
        assert port == LANE_PORT, f"ccpd connected to port {port}, not its lane's {LANE_PORT}"
        assert upstream_host(sent) == LANE_HOST, sent


@settings(FUZZ, max_examples=100)
@given(target=request_targets)
def test_upstream_requests_go_only_to_the_lanes_address(target):
    check_target(target)


@EXPLICIT
@example(target=b"x/v1/messages")
@example(target=b"0/v1/models")
@given(target=request_targets)
def test_a_target_that_is_not_origin_form_never_changes_the_lanes_address(target):
    check_target(target)


@pytest.mark.parametrize("target", [b"x/v1/messages", b"http://127.0.0.1:%d/v1/messages" % PORT,
                                    b"/v1/%FF", b"/v1/messages?a\x7fb", b"/v1/mess\x80ages"])
def test_a_target_that_is_not_a_utf8_path_gets_an_anthropic_shaped_400(target):
    """Also DEL and raw bytes over 0x7f, which Twisted's server lets through but an HTTP
    client must not send on."""
    written, upstream = post_target(target)
    assert upstream == []
    head, _, body = written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), written
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


# == 3. config parsing =============================================================================

_SECTIONS = ["server", "routing", "quotas", "logs", "store", "calibration", "routes"]
_KNOWN_KEYS = {
    "server": ["listen", "admin_token", "max_body_bytes", "allowed_hosts", "allowed_origins",
               "client_tokens", "client_tokens_file", "backlog", "header_timeout_s",
               "max_in_flight"],
    "lane": ["base_url", "auth", "probe_path", "connect_timeout_s", "idle_timeout_s", "reset_tz",
             "max_connections", "quota_url", "quota_poll"],
    "routing": ["default_lane", "reroute_mode", "cooldown_sec", "provider_max_age", "block_at"],
    "quotas": ["file"],
    "logs": ["dir", "max_bytes", "backups", "json_log"],
    "store": ["persist", "path", "rollup_interval", "retention_days"],
    "calibration": ["sample_minutes", "probe_results"],
    "routes": ["glm-4.6", "claude-x", "Model With Spaces"],
}
_ENV = ["CCP_LISTEN", "CCP_CLIENT_TOKENS", "CCP_REROUTE_MODE", "CCP_QUOTA_COOLDOWN_SEC",
        "CCP_PERSIST", "CCP_DB_PATH", "CCP_ROLLUP_INTERVAL", "CCP_ROLLUP_RETENTION_DAYS",
        "CCP_CAL_SAMPLE_MINUTES"]
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_TOKEN_MARK = "\u00a7tok\u00a7"  # appears in no other drawn text, so an echo is unmistakable

one_line = st.text(st.characters(blacklist_characters=_LINE_BREAKS, blacklist_categories=["Cs"]),
                   max_size=30)
tokens = st.text(string.ascii_letters + string.digits + "-_", max_size=30).map(
    lambda t: _TOKEN_MARK + t)
token_lists = st.lists(tokens, min_size=1, max_size=3).flatmap(
    lambda ts: st.sampled_from([", ", " ", ","]).map(lambda sep: (ts, sep.join(ts))))
config_values = st.one_of(
    st.just(""), one_line, st.text(string.printable.strip(_LINE_BREAKS) + " ", min_size=200,
                                   max_size=2000),
    st.sampled_from(["30s", "5m", "1.5h", "2d", "0", "0s", "-1s", "1e309", "nan", "inf", "1 h",
                     "9" * 500, "10", "1", "-1", "0.0001", "true", "false", "yes", "2", "maybe",
                     "tcp:8787:interface=127.0.0.1", "tcp:0", "tcp:8787:interface=0.0.0.0",
                     "unix:/run/ccpd.sock", "systemd:domain=INET:index=0", "tcp:8787:backlog=5",
                     "ssl:443:interface=\\:\\:1", "tcp6:8787:interface=[::1]", "tcp:", ":",
                     "http://upstream.invalid:9", "https://api.z.ai/api/anthropic", "http://",
                     "http://[::1", "https://x/?q=1", "ftp://x", "env:ZAI_KEY", "bearer-env:K",
                     "env:", "env:1X", "passthrough", "+08:00", "-14:59", "+15:00", "08:00",
                     "/v1/models", "v1", "hybrid", "run2cap", "preemptive", "PREEMPTIVE",
                     "anthropic", "zai", "zai, anthropic/claude-x", "nolane", ", x", "zai,",
                     "https://tool.example", "null", "tool.example", "https://a/b", "a@b",
                     "localhost:8787", "/dev/null", "etc/quotas.json", "/api/monitor/usage",
                     "1m", "59s", "0.98", "1.5"]))
# No "#" or ";" in names: configparser cuts inline comments out of section lines too.
lane_names = st.one_of(st.sampled_from(["anthropic", "zai", " spaced ", ""]),
                       st.text(st.characters(blacklist_characters=_LINE_BREAKS + "[]#;",
                                             blacklist_categories=["Cs"]), max_size=10))
junk_sections = st.text(st.characters(blacklist_characters=_LINE_BREAKS + "[]#;",
                                      blacklist_categories=["Cs"]), min_size=1, max_size=12)
junk_keys = st.text(st.characters(blacklist_characters=_LINE_BREAKS + "=#;[",
                                  blacklist_categories=["Cs"]), min_size=1, max_size=12)


@dataclass
class FuzzIni:
    text: str
    structured: bool
    sections: list[str]
    tokens: list[str]
    environ: dict[str, str]


@st.composite
def structured_inis(draw) -> FuzzIni:
    """INI text configparser reads (unique sections, unique keys, one line per value), so every
    ConfigError is about a section or key."""
    names = draw(st.lists(st.one_of(st.sampled_from(_SECTIONS),
                                    lane_names.map(lambda n: "lane:" + n),
                                    junk_sections),
                          max_size=7, unique=True))
    lines, secrets = [], []
    for section in names:
        table = "lane" if section.startswith("lane:") else section
        known = _KNOWN_KEYS.get(table, [])
        keys = draw(st.lists(st.one_of(st.sampled_from(known) if known else st.nothing(),
                                       junk_keys.map(str.strip).filter(
                                           lambda k: k and not k.startswith(("#", ";", "["))
                                           and not k.endswith(":"))),
                             max_size=6, unique=True))
        lines.append(f"[{section}]")
        for key in keys:
            if key == "client_tokens":
                drawn, value = draw(token_lists)
                secrets += drawn
            else:
                value = draw(config_values)
            lines.append(f"{key} = {value}")
    environ = {}
    for name in draw(st.lists(st.sampled_from(_ENV), max_size=2, unique=True)):
        if name == "CCP_CLIENT_TOKENS":
            drawn, environ[name] = draw(token_lists)
            secrets += drawn
        else:
            environ[name] = draw(config_values)
    return FuzzIni("\n".join(lines) + "\n", True, names, secrets, environ)


junk_inis = st.lists(st.one_of(
    one_line, st.sampled_from(["[server]", "[lane:x]", "[routes]", "[", "]", "[]", "= x",
                               "key", "  indented = 1", "[server]]", "#c", ";c", "k = v",
                               "[lane:]", "[DEFAULT]", "[\0no-defaults]", "k: v"])),
    max_size=12).map(lambda lines: FuzzIni("\n".join(lines), False, [], [], {}))


def check_config(ini: FuzzIni) -> None:
    try:
        config = config_from_string(ini.text, source="fuzz.ini", environ=ini.environ,
                                    check_files=False)
    except ConfigError as e:
        message = str(e)
        assert message.startswith(("fuzz.ini: ", "environment variable CCP_")), message
        if ini.structured and message.startswith("fuzz.ini"):
            assert re.match(r"fuzz\.ini: \[[^\]\n]+\]", message), message
        for token in ini.tokens:
            assert token not in message, message
    else:
        assert isinstance(config, Config)
        for token in ini.tokens:
            assert token not in repr(config)


@FUZZ
@given(ini=st.one_of(structured_inis(), junk_inis))
def test_a_config_starts_or_stops_with_a_clean_error_naming_the_place(ini):
    check_config(ini)


@FUZZ
@given(data=st.text(max_size=200).map(str.encode))
def test_a_config_file_of_any_text_starts_or_stops_cleanly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("config") / "fuzz.ini"
    path.write_bytes(data)
    try:
        load_config(str(path), environ={})
    except ConfigError as e:
        assert str(e).startswith(str(path)), e


@EXPLICIT
@example(data=b"[server]\nadmin_token = caf\xe9\n")
@example(data=b"\xff\xfe[\x00s\x00")
@given(data=st.binary())
def test_a_config_file_that_is_not_utf8_is_a_clean_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("config") / "fuzz.ini"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(str(path), environ={})


@EXPLICIT
@example(ini=FuzzIni(f"[server]\nclient_tokens: {_TOKEN_MARK}0123456789abcdef\n", False,
                     ["server"], [f"{_TOKEN_MARK}0123456789abcdef"], {}))
@given(ini=junk_inis)
def test_a_malformed_client_tokens_line_does_not_echo_the_token(ini):
    check_config(ini)


# == 4. quotas parsing =============================================================================

_QUOTA_KEYS = ["rolling_window_hours", "rolling_limit_tokens", "weekly_limit_tokens", "warn_pct",
               "count_cache_read", "rolling_limit_hours", "weekly_limit_hours"]
quota_numbers = st.one_of(
    st.sampled_from([0, -1, 1, 0.5, 1.0, 1.5, 168, 169, 5, 10**20, 1e308, -0.0, 1e-300, 2**63]),
    st.integers(), st.floats())
quota_entries = st.dictionaries(
    st.one_of(st.sampled_from(_QUOTA_KEYS), st.text(max_size=10)),
    st.one_of(quota_numbers, st.booleans(), st.none(), json_values), max_size=5)
quota_documents = st.one_of(
    st.fixed_dictionaries({"models": st.dictionaries(st.text(max_size=12),
                                                     st.one_of(quota_entries, json_values),
                                                     max_size=4)}),
    st.fixed_dictionaries({"models": st.dictionaries(st.text(max_size=12), quota_entries,
                                                     max_size=4)},
                          optional={"version": json_values, "": json_values}),
    json_values)


def check_quotas(text: str, document=None) -> None:
    try:
        quotas = parse_quotas(text, "fuzz.json")
    except QuotaError as e:
        message = str(e)
        assert message.startswith("fuzz.json: "), message
        if isinstance(document, dict) and set(document) == {"models"} and isinstance(
                document["models"], dict):
            # Only a model can be at fault: the message names one of them.
            assert any(message.startswith(f"fuzz.json: models.{model}")
                       for model in document["models"]), message
    else:
        assert isinstance(quotas, dict)
        assert all(isinstance(q, ModelQuota) for q in quotas.values())
        if document is not None:
            assert set(quotas) == set(document["models"])


@FUZZ
@given(document=quota_documents)
def test_quotas_are_parsed_or_refused_naming_the_model(document):
    check_quotas(json.dumps(document), document)


@FUZZ
@given(text=st.one_of(st.text(max_size=200),
                      quota_documents.flatmap(lambda doc: st.integers(0, len(json.dumps(doc)))
                                              .map(lambda cut: json.dumps(doc)[:cut]))))
def test_quotas_text_of_any_kind_is_parsed_or_refused(text):
    check_quotas(text)


@FUZZ
@given(data=st.text(max_size=200).map(str.encode))
def test_a_quotas_file_of_any_text_loads_or_is_refused_naming_it(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("quotas") / "quotas.json"
    path.write_bytes(data)
    try:
        load_quotas(str(path))
    except QuotaError as e:
        assert str(e).startswith(f"{path}: "), e


@EXPLICIT
@example(text='{"models": ' + "[" * 5000 + "]" * 5000 + "}")
@given(text=st.text())
def test_deeply_nested_quotas_are_refused(text):
    check_quotas(text)


@EXPLICIT
@example(data=b'{"models": {"caf\xe9": {}}}')
@given(data=st.binary())
def test_a_quotas_file_that_is_not_utf8_is_refused_naming_it(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("quotas") / "quotas.json"
    path.write_bytes(data)
    with pytest.raises(QuotaError, match=re.escape(str(path))):
        load_quotas(str(path))

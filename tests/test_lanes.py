"""Lanes without sockets: header rules, credentials, and the readiness rule driven by a Clock."""
import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from ccpd.config import LaneAuth, LaneConfig
from ccpd.lanes import Lane, MissingCredential, forwardable

CLIENT = Headers({
    b"x-api-key": [b"client-key"], b"authorization": [b"Bearer client-token"],
    b"anthropic-version": [b"2023-06-01"], b"anthropic-beta": [b"a", b"b"],
    b"connection": [b"keep-alive, x-private"], b"x-private": [b"1"], b"keep-alive": [b"300"],
    b"transfer-encoding": [b"chunked"], b"host": [b"127.0.0.1:8787"], b"te": [b"trailers"],
    b"content-length": [b"12"], b"accept-encoding": [b"gzip, br"],
    b"content-type": [b"application/json"],
})


def lane(auth=LaneAuth(), environ=None, **kwargs):
    config = LaneConfig(name="l", base_url="https://up.test/api", auth=auth, **kwargs)
    return Lane(config, Clock(), environ or {})


def test_forwardable_drops_hop_by_hop_and_connection_tokens():
    names = {name.lower() for name, _ in forwardable(CLIENT)}
    assert names == {b"x-api-key", b"authorization", b"anthropic-version", b"anthropic-beta",
                     b"accept-encoding", b"content-type"}


def test_passthrough_keeps_client_credentials_and_multi_values():
    headers = lane().upstream_headers(CLIENT)
    assert headers.getRawHeaders(b"x-api-key") == [b"client-key"]
    assert headers.getRawHeaders(b"authorization") == [b"Bearer client-token"]
    assert headers.getRawHeaders(b"anthropic-beta") == [b"a", b"b"]
    assert headers.getRawHeaders(b"accept-encoding") == [b"identity"]
    assert not headers.hasHeader(b"host") and not headers.hasHeader(b"x-private")


def test_env_auth_replaces_client_credentials():
    headers = lane(LaneAuth("env", "K"), {"K": "lane-key"}).upstream_headers(CLIENT)
    assert headers.getRawHeaders(b"x-api-key") == [b"lane-key"]
    assert not headers.hasHeader(b"authorization")


def test_bearer_env_auth_sends_authorization_only():
    headers = lane(LaneAuth("bearer-env", "K"), {"K": "lane-key"}).upstream_headers(CLIENT)
    assert headers.getRawHeaders(b"authorization") == [b"Bearer lane-key"]
    assert not headers.hasHeader(b"x-api-key")


def test_missing_key_is_named_without_any_credential():
    with pytest.raises(MissingCredential) as caught:
        lane(LaneAuth("env", "ZAI_KEY"), {}).upstream_headers(CLIENT)
    assert "ZAI_KEY is not set" in str(caught.value)
    assert "client-key" not in str(caught.value)


def test_url_keeps_base_path_and_query():
    assert lane().url(b"/v1/messages?beta=true") == b"https://up.test/api/v1/messages?beta=true"


class _Status(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.code = 200
        self.calls = 0

    def render_GET(self, request):
        self.calls += 1
        request.setResponseCode(self.code)
        return b"{}"


class ProbeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.lane = Lane(LaneConfig(name="l", base_url="http://up.test"), self.clock, {})
        self.upstream = _Status()
        self.lane.client = StubTreq(self.upstream)

    def probe(self):
        self.clock.advance(60)  # past the last result's interval
        return self.successResultOf(self.lane.probe())

    def test_200_to_405_is_up(self):
        for code in (200, 204, 301, 401, 403, 404, 405):
            self.upstream.code = code
            result = self.probe()
            self.assertEqual((result.up, result.status), (True, code))

    def test_above_405_is_down(self):
        for code in (406, 429, 500, 503):
            self.upstream.code = code
            result = self.probe()
            self.assertEqual((result.up, result.status), (False, code))
            self.assertIn(str(code), result.error)

    def test_a_result_is_reused_for_its_probe_interval(self):
        self.probe()
        self.successResultOf(self.lane.probe())
        self.clock.advance(29)
        self.successResultOf(self.lane.probe())
        self.assertEqual(self.upstream.calls, 1)
        self.clock.advance(1)
        self.successResultOf(self.lane.probe())
        self.assertEqual(self.upstream.calls, 2)
        self.successResultOf(self.lane.probe(max_age=0))  # the prober's: always a new one
        self.assertEqual(self.upstream.calls, 3)

    def test_missing_key_is_down_without_a_request(self):
        lane = Lane(LaneConfig(name="z", base_url="http://up.test", auth=LaneAuth("env", "NOPE")),
                    self.clock, {})
        lane.client = StubTreq(self.upstream)
        result = self.successResultOf(lane.probe())
        self.assertFalse(result.up)
        self.assertIn("NOPE is not set", result.error)
        self.assertEqual(self.upstream.calls, 0)


def test_a_lane_by_address_connects_without_a_name_lookup():
    """A name is resolved on the reactor's thread pool for each new connection: a burst of
    streams would queue there; an address needs no lookup."""
    from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                            TCP6ClientEndpoint)
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import URI

    from ccpd.lanes import _LaneEndpoints
    endpoints = _LaneEndpoints(MemoryReactorClock(), 5)
    kinds = {url: type(endpoints.endpointForURI(URI.fromBytes(url)))
             for url in (b"http://127.0.0.1:9000", b"http://[::1]:9000", b"http://fake.test")}
    assert kinds == {b"http://127.0.0.1:9000": TCP4ClientEndpoint,
                     b"http://[::1]:9000": TCP6ClientEndpoint,
                     b"http://fake.test": HostnameEndpoint}


def test_a_prober_keeps_probing_whatever_a_probe_did():
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from ccpd.timers import LaneProber
    clock = Clock()
    lane = Lane(LaneConfig(name="l", base_url="http://up.test", probe_interval=5), clock, {})
    calls = []

    class Lanes:
        def probe(self, probed, max_age=None):
            calls.append((probed.name, max_age, clock.seconds()))
            if len(calls) == 1:
                raise RuntimeError("a bug in one probe")
            return defer.succeed(None)

    prober = LaneProber(Lanes(), lane, clock=clock)
    prober.startService()
    clock.advance(5)
    clock.advance(5)
    prober.stopService()
    assert calls == [("l", 0, 0.0), ("l", 0, 5.0), ("l", 0, 10.0)]

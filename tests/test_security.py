"""No web page and no stranger on the network may spend the user's plan.

Request logic runs in memory: the Klein tree (behind its guard) under ``StubTreq``, on a
``MemoryReactorClock``, so a request that got past the guard shows up as an upstream
connection attempt in ``reactor.tcpClients`` and a refused one does not. Client-token
stripping and credentials in logs are checked against the loopback fake upstream.
"""
from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from ccpd.config import ConfigError, config_from_string
from ccpd.tap import build_service
from tests.conftest import ccpd_ini

TOKEN = "ccpd-client-token-0123456789abcdef"
OTHER_TOKEN = "ccpd-second-token-fedcba9876543210"
MESSAGE = {"model": "glm-4.6", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
PORT = 8787


def in_memory(tmp_path, server_extra: str = ""):
    """ccpd's resource tree (not started) on a memory reactor; returns (client, reactor,
    metrics)."""
    text = ccpd_ini(tmp_path, "http://upstream.invalid:9", server_extra=server_extra)
    config = config_from_string(text, source="test.ini", environ={})
    reactor = MemoryReactorClock()
    service = build_service(config, reactor, {"ZAI_TEST_KEY": "zai-secret-key-123"})
    return StubTreq(service.app.resource()), reactor, service.app.metrics


def refused(metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("ccp_requests_refused_total", {"reason": reason})


def answered(client, deferred):
    """The answer to a request, which must be complete once the in-memory client is flushed
    (a request that went on to a lane would still wait for it)."""
    client.flush()
    results = []
    deferred.addBoth(results.append)
    assert results, "no answer: the request went past ccpd's own checks"
    return results[0]


def answer(client, deferred) -> tuple[int, dict]:
    response = answered(client, deferred)
    return response.code, json.loads(answered(client, response.content()))


def send(client, method="POST", path="/v1/messages", host=f"127.0.0.1:{PORT}", **headers):
    all_headers = {"content-type": "application/json", **headers}
    if host is not None:
        all_headers["Host"] = host
    return client.request(method, f"http://127.0.0.1:{PORT}{path}", headers=all_headers,
                          data=json.dumps(MESSAGE).encode() if method == "POST" else None)


# -- Host: DNS rebinding -----------------------------------------------------------------------

@pytest.mark.parametrize("host", [f"127.0.0.1:{PORT}", f"localhost:{PORT}", f"LocalHost:{PORT}",
                                  f"[::1]:{PORT}", f"127.0.0.2:{PORT}", f"app.localhost:{PORT}",
                                  None])
def test_loopback_hosts_with_the_listening_port_reach_the_lane(tmp_path, host):
    client, reactor, metrics = in_memory(tmp_path)
    send(client, host=host)
    client.flush()
    [(_address, port, *_)] = reactor.tcpClients  # ccpd is connecting to the lane
    assert port == 9
    assert refused(metrics, "host") == 0


@pytest.mark.parametrize("host", [f"attacker.example:{PORT}", "attacker.example",
                                  "127.0.0.1:9999", "localhost", f"127.0.0.1.nip.io:{PORT}",
                                  f"localhost.attacker.example:{PORT}", f"10.0.0.8:{PORT}",
                                  "127.0.0.1:notaport", f"[::1]x:{PORT}", ""])
def test_a_foreign_host_is_refused_before_anything_is_sent(tmp_path, host):
    client, reactor, metrics = in_memory(tmp_path)
    status, body = answer(client, send(client, host=host))
    assert status == 421
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert "allowed_hosts" in body["error"]["message"]
    assert reactor.tcpClients == []
    assert refused(metrics, "host") == 1


@pytest.mark.parametrize("host, allowed", [("ccpd.lan:8787", True), ("ccpd.lan", True),
                                           ("ccpd.lan:1234", True), ("box.lan:443", True),
                                           ("box.lan:8787", False), ("other.lan:8787", False)])
def test_allowed_hosts_name_extra_hosts(tmp_path, host, allowed):
    client, _reactor, _metrics = in_memory(tmp_path, "allowed_hosts = ccpd.lan, box.lan:443")
    response = answered(client, send(client, "GET", "/v1/quotas", host=host))
    assert response.code == (200 if allowed else 421)


# -- Origin: cross-site requests from web pages ------------------------------------------------

@pytest.mark.parametrize("origin", ["https://attacker.example", "null", "http://localhost:9999",
                                    "http://127.0.0.1:8788", "file://"])
def test_a_cross_site_simple_post_is_refused(tmp_path, origin):
    client, reactor, metrics = in_memory(tmp_path)
    # What any web page can send without a CORS preflight.
    status, body = answer(client, send(client, origin=origin, **{"content-type": "text/plain"}))
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert "allowed_origins" in body["error"]["message"]
    assert reactor.tcpClients == []
    assert refused(metrics, "origin") == 1


@pytest.mark.parametrize("origin", [f"http://127.0.0.1:{PORT}", f"HTTP://127.0.0.1:{PORT}/"])
def test_ccpds_own_pages_are_same_origin(tmp_path, origin):
    client, reactor, _metrics = in_memory(tmp_path)
    send(client, origin=origin)
    client.flush()
    assert len(reactor.tcpClients) == 1


def test_allowed_origins_are_accepted_and_null_only_when_listed(tmp_path):
    client, reactor, _metrics = in_memory(
        tmp_path, "allowed_origins = https://tool.example:8443, null")
    send(client, origin="https://tool.example:8443")
    send(client, origin="null")
    client.flush()
    assert len(reactor.tcpClients) == 2
    assert answered(client, send(client, origin="https://tool.example")).code == 403


def test_ops_endpoints_are_guarded_too(tmp_path):
    client, _reactor, _metrics = in_memory(tmp_path)
    for path in ("/v1/usage", "/metrics", "/healthz", "/v1/usage/samples"):
        response = answered(client, send(client, "GET", path, origin="https://attacker.example"))
        assert response.code == 403, path


# -- client tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong-token-0123456789abc"},
                                     {"authorization": f"Basic {TOKEN}"},
                                     {"authorization": "Bearer "}])
def test_without_a_client_token_requests_get_401(tmp_path, headers):
    client, reactor, metrics = in_memory(tmp_path, f"client_tokens = {TOKEN} {OTHER_TOKEN}")
    status, body = answer(client, send(client, **headers))
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert TOKEN not in json.dumps(body)
    assert reactor.tcpClients == []
    assert refused(metrics, "client_token") == 1


@pytest.mark.parametrize("headers", [{"x-api-key": TOKEN}, {"authorization": f"Bearer {TOKEN}"},
                                     {"authorization": f"bearer {OTHER_TOKEN}"}])
def test_a_client_token_lets_requests_through(tmp_path, headers):
    client, reactor, _metrics = in_memory(tmp_path, f"client_tokens = {TOKEN}, {OTHER_TOKEN}")
    send(client, **headers)
    client.flush()
    assert len(reactor.tcpClients) == 1


def test_healthz_needs_no_client_token_but_usage_does(tmp_path):
    client, _reactor, _metrics = in_memory(tmp_path, f"client_tokens = {TOKEN}")
    assert answered(client, send(client, "GET", "/healthz")).code == 200
    assert answered(client, send(client, "GET", "/v1/usage")).code == 401
    assert answered(client, send(client, "GET", "/v1/usage", **{"x-api-key": TOKEN})).code == 200


@pytest_twisted.ensureDeferred
async def test_the_client_token_never_reaches_the_lane_or_a_log(tmp_path, fake_upstream,
                                                                start_ccpd):
    ccpd = await start_ccpd(fake_upstream.url(), server_extra=f"client_tokens = {TOKEN}")
    # Z.AI lane: ccpd injects its key; passthrough lane: the client's own key goes on.
    glm = await treq.post(ccpd.url + "/v1/messages", json.dumps(MESSAGE).encode(),
                          headers={"content-type": "application/json",
                                   "authorization": f"Bearer {TOKEN}"})
    assert glm.code == 200, await glm.content()
    claude = await treq.post(ccpd.url + "/v1/messages",
                             json.dumps({**MESSAGE, "model": "claude-x"}).encode(),
                             headers={"content-type": "application/json", "x-api-key": TOKEN,
                                      "authorization": "Bearer sk-ant-oauth-of-the-user"})
    assert claude.code == 200, await claude.content()
    to_zai, to_anthropic = fake_upstream.requests
    assert to_zai.headers["x-api-key"] == "zai-secret-key-123"
    assert "authorization" not in to_zai.headers
    assert to_anthropic.headers["authorization"] == "Bearer sk-ant-oauth-of-the-user"
    assert "x-api-key" not in to_anthropic.headers
    assert [line["status"] for line in ccpd.usage_lines()] == [200, 200]
    for path in (tmp_path / "logs").iterdir():
        assert TOKEN.encode() not in path.read_bytes(), path


# -- configuration -----------------------------------------------------------------------------

OPEN_LISTEN = """
[server]
listen = tcp:8787:interface=0.0.0.0
{server}

[lane:anthropic]
base_url = https://api.anthropic.com

[lane:zai]
base_url = https://api.z.ai/api/anthropic
auth = {auth}
"""


def parse(server: str = "", auth: str = "env:ZAI_API_KEY", environ=None):
    return config_from_string(OPEN_LISTEN.format(server=server, auth=auth), source="ccp.ini",
                              environ=environ or {}, check_files=False)


def test_a_network_listen_with_an_injected_key_and_no_tokens_does_not_start():
    with pytest.raises(ConfigError) as caught:
        parse()
    message = str(caught.value)
    assert message.startswith("ccp.ini: [server] listen: tcp:8787:interface=0.0.0.0")
    assert "zai" in message and "client_tokens" in message and "client_tokens_file" in message


@pytest.mark.parametrize("listen", ["tcp:8787", "tcp:8787:interface=192.168.1.5",
                                    "systemd:domain=INET:index=0"])
def test_every_non_loopback_listen_counts(listen):
    with pytest.raises(ConfigError, match=r"\[server\] listen"):
        parse(environ={"CCP_LISTEN": listen})


def test_network_listens_start_with_tokens_or_passthrough_lanes_only(tmp_path):
    assert parse(f"client_tokens = {TOKEN}").server.client_tokens == (TOKEN,)
    assert parse(environ={"CCP_CLIENT_TOKENS": TOKEN}).server.client_tokens == (TOKEN,)
    assert parse(auth="passthrough").server.client_tokens == ()
    assert parse(environ={"CCP_LISTEN": "tcp:8787:interface=127.0.0.1"}).server.listen \
        .endswith("127.0.0.1")
    assert parse(environ={"CCP_LISTEN": "unix:/run/ccpd.sock"}).server.listen_is_loopback


def test_client_tokens_file(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# team tokens\n{TOKEN}\n\n{OTHER_TOKEN}  # bob\n")
    text = OPEN_LISTEN.format(server=f"client_tokens_file = {tokens}", auth="env:K")
    config = config_from_string(text, source="ccp.ini", environ={}, check_files=True)
    assert config.server.client_tokens == (TOKEN, OTHER_TOKEN)
    text = OPEN_LISTEN.format(server=f"client_tokens_file = {tmp_path}/none", auth="env:K")
    with pytest.raises(ConfigError, match=r"ccp.ini: \[server\] client_tokens_file: cannot "):
        config_from_string(text, source="ccp.ini", environ={}, check_files=True)


def test_a_short_token_is_an_error_that_does_not_show_it():
    with pytest.raises(ConfigError) as caught:
        parse("client_tokens = hunter2")
    assert "[server] client_tokens" in str(caught.value) and "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(parse(f"client_tokens = {TOKEN}hunter2").server)


@pytest.mark.parametrize("key, value", [("allowed_origins", "attacker.example"),
                                        ("allowed_origins", "https://a.example/path"),
                                        ("allowed_hosts", "https://a.example"),
                                        ("backlog", "0"), ("max_in_flight", "-1"),
                                        ("header_timeout_s", "0"), ("backlog", "many")])
def test_bad_server_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"\[server\] {key}: "):
        parse(f"client_tokens = {TOKEN}\n{key} = {value}")

"""Quotas and the reroute policy: a Z.AI-like lane that runs out, an Anthropic-like secondary,
ccpd in between. Asserted: what the client gets, the usage and anomaly lines, the metrics,
/v1/usage and the quota endpoints.

The decisions run in memory on a Clock (so cooldowns and windows are crossed by advancing
it); ``ccp status`` and promtool, which need a real port and a process, run on loopback.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from ccpd import cli
from tests.support import MESSAGE, post

GLM = {**MESSAGE, "model": "glm-4.6"}
COOLDOWN_SEC = 300  # ccpd's default [routing] cooldown_sec


def write_quotas(tmp_path, **models):
    (tmp_path / "quotas.json").write_text(json.dumps({"models": models}))


def memory_pair(memory_ccpd, mode, **zai_options):
    """ccpd in memory with its zai lane on a fake of its own (``zai_options``)."""
    return memory_ccpd(extra=f"[routing]\nreroute_mode = {mode}\n", zai=zai_options)


async def start_pair(start_ccpd, make_fake, mode, **zai_options):
    anthropic, zai = make_fake(), make_fake(**zai_options)
    ccpd = await start_ccpd(anthropic.url(), extra=f"[routing]\nreroute_mode = {mode}\n",
                            zai_url=zai.url())
    return ccpd, anthropic, zai


def test_run2cap_reroutes_a_1308_answer_to_the_secondary_with_the_rewritten_model(
        memory_ccpd):
    ccpd = memory_pair(memory_ccpd, "run2cap", limit_tokens=0)
    sent = ccpd.send_post("/v1/messages", GLM, {"x-fake-first-byte-ms": "250"})
    ccpd.advance(0.25)  # the limit answer comes after 250 ms ...
    ccpd.advance(0.25)  # ... and the secondary's after 250 more
    response = ccpd.settle(sent)
    assert response.code == 200 and response.json()["model"] == "claude-sonnet-4-5"
    assert [r.path for r in ccpd.zai.requests] == ["/api/anthropic/v1/messages"]
    assert json.loads(ccpd.upstream.requests[-1].body)["model"] == "claude-sonnet-4-5"
    [line] = ccpd.usage_lines()
    assert (line["model"], line["served_model"], line["lane"], line["reroute_decision"],
            line["reroute_attempt"], line["preferred_attempt"]) == \
        ("glm-4.6", "claude-sonnet-4-5", "anthropic", "rerouted_limit", 1, True)
    assert line["wasted_retry_ms"] == 250 and line["input_tokens"] == 12
    [anomaly] = ccpd.anomaly_lines()
    assert anomaly["kind"] == "upstream_limit" and "1308" in anomaly["detail"]
    assert ccpd.metric("ccp_rerouted_on_limit_total", model="glm-4.6", mode="run2cap") == 1.0
    assert ccpd.metric("ccp_wasted_retry_seconds_total", model="glm-4.6") == \
        pytest.approx(0.25)
    # run2cap keeps trying the preferred lane: no cooldown
    assert ccpd.post("/v1/messages", GLM).code == 200
    assert len(ccpd.zai.requests) == 2


FAKE_RESET_S = 30 * 60  # the fake's Z.AI limit answers reset 30 minutes after they are sent


def test_hybrid_flips_lanes_until_the_reset_the_limit_answer_reports(memory_ccpd):
    """Z.AI's 1310 says when the weekly limit lifts (the fake: in 30 minutes, as a wall-clock
    time in Beijing): the cooldown lasts until then, not cooldown_sec."""
    ccpd = memory_pair(memory_ccpd, "hybrid", limit_tokens=0, limit_code="1310")
    stream = ccpd.post("/v1/messages", {**GLM, "stream": True})
    assert stream.code == 200 and stream.body.count(b"event: content_block_delta") == 5
    assert b'"model":"claude-sonnet-4-5"' in stream.body
    ccpd.advance(FAKE_RESET_S - 1)
    again = ccpd.post("/v1/messages", GLM)
    assert again.code == 200 and again.json()["model"] == "claude-sonnet-4-5"
    assert len(ccpd.zai.requests) == 1  # the second request skipped the cooling lane
    first, second = ccpd.usage_lines()
    assert first["reroute_decision"] == "rerouted_limit" and first["cooldown_active"] is True
    assert first["limit_class"] == "window_exhausted:weekly"
    assert "window_exhausted:weekly" in first["decision_reason"]
    assert (second["reroute_decision"], second["preferred_attempt"]) == \
        ("rerouted_cooldown", False)
    assert second["cooldown_next_ts"] == first["cooldown_next_ts"] == first["ts"] + FAKE_RESET_S
    assert ccpd.metric("ccp_rerouted_on_limit_total", model="glm-4.6", mode="hybrid") == 2.0
    view = ccpd.get("/v1/usage").json()["models"]["glm-4.6"]
    assert view["policy"]["cooldown_active"] is True
    assert view["policy"]["cooldown_remaining_sec"] == 1.0
    assert view["policy"]["last_decision"] == "rerouted_cooldown"
    # once the cooldown is over, the preferred lane is tried again
    ccpd.advance(1)
    ccpd.post("/v1/messages", GLM)
    assert len(ccpd.zai.requests) == 2
    assert ccpd.usage_lines()[-1]["reroute_attempt"] == 1  # ... and still answers with a limit


def test_preemptive_skips_a_lane_whose_quota_blocks(tmp_path, memory_ccpd):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 100, "warn_pct": 0.5}})
    ccpd = memory_pair(memory_ccpd, "preemptive")
    headers = {"x-fake-input-tokens": "95"}
    ccpd.post("/v1/messages", GLM, headers)  # 100 tokens
    response = ccpd.post("/v1/messages", GLM, headers)
    assert response.json()["model"] == "claude-sonnet-4-5"
    assert len(ccpd.zai.requests) == 1 and len(ccpd.upstream.requests) == 1
    first, second = ccpd.usage_lines()
    assert (first["lane"], first["headroom_pct_rolling"], first["quota_headroom_pct"]) == \
        ("zai", 0.0, 0.0)
    assert (second["reroute_decision"], second["lane"]) == ("rerouted_quota", "anthropic")
    models = ccpd.get("/v1/usage").json()["models"]
    view = models["glm-4.6"]
    assert view["rolling"]["used_tokens"] == 100 and view["block"] is True
    assert view["state"] == "block" and view["rolling"]["headroom_pct"] == 0.0
    # the tokens the secondary served count against the secondary model
    assert models["claude-sonnet-4-5"]["rolling"]["used_tokens"] == 100
    assert ccpd.metric("ccp_quota_headroom_ratio", model="glm-4.6", window="rolling") == 0.0
    # five hours on (the window counts in minutes), it is empty and the preferred lane serves
    ccpd.advance(5 * 3600 + 60)
    assert ccpd.post("/v1/messages", GLM).json()["model"] == "glm-4.6"
    assert ccpd.usage_lines()[-1]["reroute_decision"] == "preferred"


def test_no_lane_left_answers_429_with_a_computed_retry_after(tmp_path, memory_ccpd):
    write_quotas(tmp_path, **{"glm-solo": {"rolling_limit_tokens": 50}})
    ccpd = memory_pair(memory_ccpd, "preemptive")
    solo = {**MESSAGE, "model": "glm-solo"}
    ccpd.post("/v1/messages", solo, {"x-fake-input-tokens": "60"})  # 65 of 50 tokens
    ccpd.advance(3600)
    response = ccpd.post("/v1/messages", solo)
    assert response.error() == (429, "rate_limit_error")
    # a typical request (65 tokens) never fits a 50-token window: retry in a window's length
    assert int(response.header("retry-after")) == 5 * 3600
    assert len(ccpd.zai.requests) == 1
    line = ccpd.usage_lines()[-1]
    assert (line["status"], line["reroute_decision"], line["preferred_attempt"]) == \
        (429, "blocked", False)
    assert ccpd.anomaly_lines()[-1]["kind"] == "quota_blocked"
    # once the 65 tokens left the window (it counts in minutes), the lane is tried again
    ccpd.advance(4 * 3600 + 60)
    assert ccpd.post("/v1/messages", solo).code == 200
    assert len(ccpd.zai.requests) == 2


def test_limit_answer_with_no_secondary_reaches_the_client_untouched(memory_ccpd):
    ccpd = memory_pair(memory_ccpd, "hybrid", limit_tokens=0)
    response = ccpd.post("/v1/messages", {**MESSAGE, "model": "glm-solo"})
    assert response.code == 429 and response.json()["error"]["code"] == "1308"
    [line] = ccpd.usage_lines()
    assert (line["status"], line["err_type"], line["lane"]) == (429, "1308", "zai")
    assert line["reroute_decision"] == "preferred"


@pytest_twisted.ensureDeferred
async def test_usage_view_after_real_traffic_shows_tokens_speeds_and_warn(tmp_path, start_ccpd,
                                                                           make_fake):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 1000,
                                          "weekly_limit_tokens": 10000, "warn_pct": 0.1}})
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "hybrid")
    for _ in range(2):
        await (await post(ccpd.url + "/v1/messages", {**GLM, "stream": True},
                          {"x-fake-input-tokens": "50", "x-fake-events": "10"})).content()
    view = (await usage_view(ccpd))["models"]["glm-4.6"]
    assert view["requests"] == 2 and view["input_tokens"] == 100 and view["output_tokens"] == 20
    assert view["rolling"]["used_tokens"] == 120 and view["rolling"]["limit_tokens"] == 1000
    assert view["rolling"]["headroom_pct"] == 88.0 and view["weekly"]["headroom_pct"] == 98.8
    assert view["state"] == "warn" and view["warn"] is True and view["block"] is False
    assert view["speeds"]["samples"] == 2 and view["speeds"]["out_tps_total"] > 0
    assert view["warn_pct_auto"] == 0.1 and view["min_samples_reached"] is False
    await (await post(ccpd.url + "/v1/messages", GLM)).content()  # sent while in warn
    assert ccpd.metric("ccp_preferred_attempt_total", model="glm-4.6", lane="zai") == 1.0
    # and a person running `ccp status` sees it
    printed = await deferToThread(run_cli, ["status", "--speeds", "--url", ccpd.url])
    [row] = [line for line in printed.splitlines() if line.startswith("glm-4.6 ")]
    assert "137/1k" in row and "86.3%" in row and "WARN" in row


async def usage_view(ccpd) -> dict:
    return json.loads(await (await treq.get(ccpd.url + "/v1/usage")).content())


def run_cli(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


def test_quota_reload_keeps_the_old_quotas_on_bad_input(tmp_path, memory_ccpd):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 1000}})
    ccpd = memory_ccpd()
    (tmp_path / "quotas.json").write_text('{"models": {"glm-4.6": {"warn_pct": 7}}}')
    refused = ccpd.request("POST", "/v1/quotas/reload")
    assert refused.error() == (400, "invalid_request_error")
    assert "models.glm-4.6.warn_pct" in refused.json()["error"]["message"]
    quotas = ccpd.get("/v1/quotas").json()
    assert quotas["models"]["glm-4.6"]["rolling_limit_tokens"] == 1000
    (tmp_path / "quotas.json").write_text('{"models": {"glm-4.6": {"rolling_limit_tokens": 5}}}')
    ccpd.advance(60)
    accepted = ccpd.request("POST", "/v1/quotas/reload")
    assert accepted.code == 200 and accepted.json()["reloaded"] is True
    assert accepted.json()["models"]["glm-4.6"]["rolling_limit_tokens"] == 5
    assert ccpd.get("/v1/quotas").json()["loaded_at"] == ccpd.clock.seconds()


ADMIN = {"authorization": "Bearer s3cret-admin"}


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"},
                                     {"authorization": "s3cret-admin"},
                                     {"authorization": "Bearer s3cret-admin2"},
                                     {"x-api-key": "s3cret-admin"}])
def test_admin_endpoints_refuse_without_the_admin_token(tmp_path, memory_ccpd, headers):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 1000}})
    ccpd = memory_ccpd(server_extra="admin_token = s3cret-admin")
    sim = json.dumps({"model": "glm-4.6", "input_tokens": 700}).encode()
    denied = ccpd.request("POST", "/v1/usage/sim", sim, headers)
    assert denied.error() == (401, "authentication_error")
    assert "admin_token" in denied.json()["error"]["message"]
    assert ccpd.request("POST", "/v1/quotas/reload", headers=headers).error() == \
        (401, "authentication_error")
    assert ccpd.get("/v1/usage").json()["models"]["glm-4.6"]["requests"] == 0


def test_usage_sim_with_the_admin_token(tmp_path, memory_ccpd):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 1000}})
    ccpd = memory_ccpd(server_extra="admin_token = s3cret-admin")
    sim = json.dumps({"model": "glm-4.6", "input_tokens": 700, "output_tokens": 300,
                      "seconds": 1800}).encode()
    response = ccpd.request("POST", "/v1/usage/sim", sim, ADMIN)
    view = response.json()
    assert response.code == 200 and view["model"] == "glm-4.6"
    assert view["block"] is True and view["rolling"]["used_hours"] == 0.5
    assert view["rolling"]["used_tokens"] == 1000
    assert ccpd.request("POST", "/v1/quotas/reload", headers=ADMIN).code == 200
    assert ccpd.usage_lines() == []  # simulated usage is no request


def test_usage_sim_without_an_admin_token_configured_is_open(tmp_path, memory_ccpd):
    ccpd = memory_ccpd()
    response = ccpd.request("POST", "/v1/usage/sim", b'{"model": "m", "output_tokens": 3}')
    assert response.code == 200 and response.json()["requests"] == 1


@pytest.mark.parametrize("body, words", [
    (b"{nope", "body is not valid JSON"),
    (b"[1]", 'body must be an object with a "model" string'),
    (b'{"model": ""}', 'body must be an object with a "model" string'),
    (b'{"model": "x", "input_tokens": -1}', "input_tokens must be a whole number >= 0"),
    (b'{"model": "x", "output_tokens": 1.5}', "output_tokens must be a whole number >= 0"),
    (b'{"model": "x", "cache_read_input_tokens": true}',
     "cache_read_input_tokens must be a whole number >= 0"),
    (b'{"model": "x", "seconds": -1}', "seconds must be a number >= 0"),
    (b'{"model": "x", "seconds": "1"}', "seconds must be a number >= 0"),
    (b'{"model": "x", "tokens": 1}', "unknown field 'tokens'"),
])
def test_usage_sim_checks_its_body(memory_ccpd, body, words):
    ccpd = memory_ccpd(server_extra="admin_token = s3cret-admin")
    bad = ccpd.request("POST", "/v1/usage/sim", body, ADMIN)
    assert bad.error() == (400, "invalid_request_error")
    assert words in bad.json()["error"]["message"]
    assert "x" not in ccpd.get("/v1/usage").json()["models"]


@pytest_twisted.ensureDeferred
async def test_metrics_pass_promtool_after_every_kind_of_traffic(tmp_path, start_ccpd,
                                                                 make_fake):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 10, "warn_pct": 0.5}})
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "hybrid", limit_tokens=0)
    anthropic.unified = {"5h": 0.3, "7d": 0.1}  # the provider's own figures, on every answer
    await (await post(ccpd.url + "/v1/messages", GLM)).content()                  # rerouted
    await (await post(ccpd.url + "/v1/messages", {**MESSAGE, "stream": True})).content()
    await (await treq.get(ccpd.url + "/readyz")).content()
    await ccpd.service.getServiceNamed("store-service").roller.tick()
    text = (await (await treq.get(ccpd.url + "/metrics")).content()).decode()
    checked = await deferToThread(subprocess.run, [promtool, "check", "metrics"],
                                  input=text.encode(), capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in ("ccp_requests_total", "ccp_tokens_total", "ccp_quota_headroom_ratio",
                 "ccp_rerouted_on_limit_total", "ccp_wasted_retry_seconds_total",
                 "ccp_store_writes_total", "ccp_rollup_duration_seconds_count",
                 "ccp_store_size_bytes", "ccp_lane_up", "ccp_provider_utilization_ratio",
                 "ccp_provider_reset_timestamp_seconds", "ccp_limit_answers_total"):
        assert name in text

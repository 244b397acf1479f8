"""Quotas and the reroute policy on real loopback sockets: a Z.AI-like lane that runs out, an
Anthropic-like secondary, ccpd in between. Asserted: what the client gets, the usage and anomaly
lines, /metrics, /v1/usage and the quota endpoints.
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

from tests.test_proxy import MESSAGE, post

GLM = {**MESSAGE, "model": "glm-4.6"}


def write_quotas(tmp_path, **models):
    (tmp_path / "quotas.json").write_text(json.dumps({"models": models}))


async def metrics_text(ccpd) -> str:
    return (await (await treq.get(ccpd.url + "/metrics")).content()).decode()


async def usage_view(ccpd) -> dict:
    return json.loads(await (await treq.get(ccpd.url + "/v1/usage")).content())


async def start_pair(start_ccpd, make_fake, mode, **zai_options):
    anthropic, zai = make_fake(), make_fake(**zai_options)
    ccpd = await start_ccpd(anthropic.url(), extra=f"[routing]\nreroute_mode = {mode}\n",
                            zai_url=zai.url())
    return ccpd, anthropic, zai


@pytest_twisted.ensureDeferred
async def test_run2cap_reroutes_a_1308_answer_to_the_secondary_with_the_rewritten_model(
        start_ccpd, make_fake):
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "run2cap", limit_tokens=0)
    response = await post(ccpd.url + "/v1/messages", GLM)
    answer = json.loads(await response.content())
    assert response.code == 200 and answer["model"] == "claude-sonnet-4-5"
    assert [r.path for r in zai.requests] == ["/api/anthropic/v1/messages"]
    assert json.loads(anthropic.requests[-1].body)["model"] == "claude-sonnet-4-5"
    [line] = ccpd.usage_lines()
    assert (line["model"], line["served_model"], line["lane"], line["reroute_decision"],
            line["reroute_attempt"], line["preferred_attempt"]) == \
        ("glm-4.6", "claude-sonnet-4-5", "anthropic", "rerouted_limit", 1, True)
    assert line["wasted_retry_ms"] >= 0 and line["input_tokens"] == 12
    [anomaly] = ccpd.anomaly_lines()
    assert anomaly["kind"] == "upstream_limit" and "1308" in anomaly["detail"]
    text = await metrics_text(ccpd)
    assert 'ccp_rerouted_on_limit_total{mode="run2cap",model="glm-4.6"} 1.0' in text
    assert 'ccp_wasted_retry_seconds_total{model="glm-4.6"}' in text
    # run2cap keeps trying the preferred lane: no cooldown
    await (await post(ccpd.url + "/v1/messages", GLM)).content()
    assert len(zai.requests) == 2


@pytest_twisted.ensureDeferred
async def test_hybrid_flips_lanes_for_the_cooldown_after_a_limit_answer(start_ccpd, make_fake):
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "hybrid", limit_tokens=0,
                                            limit_code="1310")
    stream = await post(ccpd.url + "/v1/messages", {**GLM, "stream": True})
    body = await stream.content()
    assert stream.code == 200 and body.count(b"event: content_block_delta") == 5
    assert b'"model":"claude-sonnet-4-5"' in body
    again = await post(ccpd.url + "/v1/messages", GLM)
    assert again.code == 200 and json.loads(await again.content())["model"] == \
        "claude-sonnet-4-5"
    assert len(zai.requests) == 1  # the second request skipped the cooling lane
    first, second = ccpd.usage_lines()
    assert first["reroute_decision"] == "rerouted_limit" and first["cooldown_active"] is True
    assert (second["reroute_decision"], second["preferred_attempt"]) == \
        ("rerouted_cooldown", False)
    assert second["cooldown_next_ts"] == first["cooldown_next_ts"] > second["ts"]
    assert 'ccp_rerouted_on_limit_total{mode="hybrid",model="glm-4.6"} 2.0' in \
        await metrics_text(ccpd)
    view = (await usage_view(ccpd))["models"]["glm-4.6"]
    assert view["policy"]["cooldown_active"] is True
    assert view["policy"]["last_decision"] == "rerouted_cooldown"


@pytest_twisted.ensureDeferred
async def test_preemptive_skips_a_lane_whose_quota_blocks(tmp_path, start_ccpd, make_fake):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 100, "warn_pct": 0.5}})
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "preemptive")
    headers = {"x-fake-input-tokens": "95"}
    await (await post(ccpd.url + "/v1/messages", GLM, headers)).content()  # 100 tokens
    response = await post(ccpd.url + "/v1/messages", GLM, headers)
    assert json.loads(await response.content())["model"] == "claude-sonnet-4-5"
    assert len(zai.requests) == 1 and len(anthropic.requests) == 1
    first, second = ccpd.usage_lines()
    assert (first["lane"], first["headroom_pct_rolling"], first["quota_headroom_pct"]) == \
        ("zai", 0.0, 0.0)
    assert (second["reroute_decision"], second["lane"]) == ("rerouted_quota", "anthropic")
    view = (await usage_view(ccpd))["models"]["glm-4.6"]
    assert view["rolling"]["used_tokens"] == 100 and view["block"] is True
    assert view["state"] == "block" and view["rolling"]["headroom_pct"] == 0.0
    # the tokens the secondary served count against the secondary model
    assert (await usage_view(ccpd))["models"]["claude-sonnet-4-5"]["rolling"][
        "used_tokens"] == 100
    assert 'ccp_quota_headroom_ratio{model="glm-4.6",window="rolling"} 0.0' in \
        await metrics_text(ccpd)


@pytest_twisted.ensureDeferred
async def test_no_lane_left_answers_429_with_a_computed_retry_after(tmp_path, start_ccpd,
                                                                     make_fake):
    write_quotas(tmp_path, **{"glm-solo": {"rolling_limit_tokens": 50}})
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "preemptive")
    solo = {**MESSAGE, "model": "glm-solo"}
    await (await post(ccpd.url + "/v1/messages", solo, {"x-fake-input-tokens": "60"})).content()
    response = await post(ccpd.url + "/v1/messages", solo)
    body = json.loads(await response.content())
    assert response.code == 429 and body["error"]["type"] == "rate_limit_error"
    retry_after = int(response.headers.getRawHeaders("retry-after")[0])
    assert 5 * 3600 - 120 <= retry_after <= 5 * 3600 + 60
    assert len(zai.requests) == 1
    line = ccpd.usage_lines()[-1]
    assert (line["status"], line["reroute_decision"], line["preferred_attempt"]) == \
        (429, "blocked", False)
    assert ccpd.anomaly_lines()[-1]["kind"] == "quota_blocked"


@pytest_twisted.ensureDeferred
async def test_limit_answer_with_no_secondary_reaches_the_client_untouched(start_ccpd, make_fake):
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "hybrid", limit_tokens=0)
    response = await post(ccpd.url + "/v1/messages", {**MESSAGE, "model": "glm-solo"})
    error = json.loads(await response.content())["error"]
    assert response.code == 429 and error["code"] == "1308"
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
    assert 'ccp_preferred_attempt_total{lane="zai",model="glm-4.6"} 1.0' in \
        await metrics_text(ccpd)
    # and a person running `ccp status` sees it
    printed = await deferToThread(run_cli, ["status", "--speeds", "--url", ccpd.url])
    [row] = [line for line in printed.splitlines() if line.startswith("glm-4.6 ")]
    assert "137/1k" in row and "86.3%" in row and "WARN" in row


def run_cli(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@pytest_twisted.ensureDeferred
async def test_quota_reload_keeps_the_old_quotas_on_bad_input(tmp_path, start_ccpd,
                                                               fake_upstream):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 1000}})
    ccpd = await start_ccpd(fake_upstream.url())
    (tmp_path / "quotas.json").write_text('{"models": {"glm-4.6": {"warn_pct": 7}}}')
    refused = await treq.post(ccpd.url + "/v1/quotas/reload")
    body = json.loads(await refused.content())
    assert refused.code == 400 and "models.glm-4.6.warn_pct" in body["error"]["message"]
    quotas = json.loads(await (await treq.get(ccpd.url + "/v1/quotas")).content())
    assert quotas["models"]["glm-4.6"]["rolling_limit_tokens"] == 1000
    (tmp_path / "quotas.json").write_text('{"models": {"glm-4.6": {"rolling_limit_tokens": 5}}}')
    accepted = await treq.post(ccpd.url + "/v1/quotas/reload")
    assert accepted.code == 200
    assert json.loads(await accepted.content())["models"]["glm-4.6"]["rolling_limit_tokens"] == 5


@pytest_twisted.ensureDeferred
async def test_usage_sim_and_the_admin_token(tmp_path, start_ccpd, fake_upstream):
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 1000}})
    ccpd = await start_ccpd(fake_upstream.url(), server_extra="admin_token = s3cret-admin")
    sim = json.dumps({"model": "glm-4.6", "input_tokens": 700, "output_tokens": 300,
                      "seconds": 1800}).encode()
    for headers in ({}, {"authorization": "Bearer wrong"}):
        denied = await treq.post(ccpd.url + "/v1/usage/sim", data=sim, headers=headers)
        assert denied.code == 401 and b"authentication_error" in await denied.content()
        reload = await treq.post(ccpd.url + "/v1/quotas/reload", headers=headers)
        assert reload.code == 401
    assert "glm-4.6" not in (await usage_view(ccpd))["models"] or \
        (await usage_view(ccpd))["models"]["glm-4.6"]["requests"] == 0
    admin = {"authorization": "Bearer s3cret-admin"}
    response = await treq.post(ccpd.url + "/v1/usage/sim", data=sim, headers=admin)
    view = json.loads(await response.content())
    assert response.code == 200 and view["block"] is True and view["rolling"]["used_hours"] == 0.5
    bad = await treq.post(ccpd.url + "/v1/usage/sim", data=b'{"model": "x", "input_tokens": -1}',
                          headers=admin)
    assert bad.code == 400 and b"input_tokens" in await bad.content()


@pytest_twisted.ensureDeferred
async def test_metrics_pass_promtool_after_every_kind_of_traffic(tmp_path, start_ccpd,
                                                                 make_fake):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    write_quotas(tmp_path, **{"glm-4.6": {"rolling_limit_tokens": 10, "warn_pct": 0.5}})
    ccpd, anthropic, zai = await start_pair(start_ccpd, make_fake, "hybrid", limit_tokens=0)
    await (await post(ccpd.url + "/v1/messages", GLM)).content()                  # rerouted
    await (await post(ccpd.url + "/v1/messages", {**MESSAGE, "stream": True})).content()
    await (await treq.get(ccpd.url + "/readyz")).content()
    await ccpd.service.getServiceNamed("store-service").roller.tick()
    text = await metrics_text(ccpd)
    checked = await deferToThread(subprocess.run, [promtool, "check", "metrics"],
                                  input=text.encode(), capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in ("ccp_requests_total", "ccp_tokens_total", "ccp_quota_headroom_ratio",
                 "ccp_rerouted_on_limit_total", "ccp_wasted_retry_seconds_total",
                 "ccp_store_writes_total", "ccp_rollup_duration_seconds_count",
                 "ccp_store_size_bytes", "ccp_lane_up"):
        assert name in text

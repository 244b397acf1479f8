"""Provider truth end to end, on loopback: ccpd with no ``quotas.json`` entry at all warns,
reroutes and waits for the reset from what the provider itself reports, shows it in
``/v1/usage``, ``/metrics``, usage lines and ``ccp status``, and keeps it across a restart.

The lanes are loopback fake upstreams answering with Anthropic's unified rate-limit headers
and the recorded limit answers of ``fixtures/limits/answers.json``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from ccpd.config import config_from_string
from ccpd.tap import build_service
from tests.support import MESSAGE, ZAI_SECRET, ccpd_ini, post, until

ROOT = Path(__file__).resolve().parent.parent

GLM = {**MESSAGE, "model": "glm-4.6"}
PREEMPTIVE = "[routing]\ndefault_lane = anthropic\nreroute_mode = preemptive\n"


async def get_json(url: str) -> dict:
    return json.loads(await (await treq.get(url)).content())


async def send(ccpd, body=GLM) -> dict:
    """One Messages request through ccpd; its usage line."""
    response = await post(ccpd.url + "/v1/messages", body)
    await response.content()
    assert response.code == 200
    return ccpd.usage_lines()[-1]


def messages_to(fake) -> int:
    return sum(r.method == "POST" and r.path.endswith("/v1/messages") for r in fake.requests)


def ccp_status(url: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ccpd.cli", "status", "--url", url],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest_twisted.ensureDeferred
async def test_the_providers_figure_warns_and_blocks_without_any_quota(tmp_path, start_ccpd,
                                                                        make_fake):
    anthropic, zai = make_fake(), make_fake()
    zai.unified = {"5h": 0.85, "7d": 0.30}  # what every answer of the zai plan says
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url(), extra=PREEMPTIVE)

    line = await send(ccpd)
    assert (line["lane"], line["reroute_decision"]) == ("zai", "preferred")
    assert (line["provider_utilization_5h"], line["provider_utilization_7d"]) == (0.85, 0.30)
    view = (await get_json(ccpd.url + "/v1/usage"))["models"]["glm-4.6"]
    assert (view["quota"], view["state"], view["evidence"]) == (None, "warn", "provider")
    assert view["provider"]["five_hour"]["utilization"] == 0.85
    lane = (await get_json(ccpd.url + "/v1/usage"))["lanes"]["zai"]
    assert lane["provider"]["windows"]["seven_day"]["utilization"] == 0.30
    assert ccpd.metric("ccp_provider_utilization_ratio", lane="zai", window="five_hour") == 0.85

    status = await deferToThread(ccp_status, ccpd.url)
    [row] = [line for line in status.splitlines() if line.startswith("glm-4.6 ")]
    assert "WARN" in row and row.split()[-2:] == ["85%", "30%"]
    assert "zai: five_hour 85%" in status

    zai.unified = {"5h": 0.99}  # past block_at (0.98): the next request goes elsewhere
    await send(ccpd)
    rerouted = await send(ccpd)
    assert (rerouted["lane"], rerouted["reroute_decision"]) == ("anthropic", "rerouted_quota")
    assert "provider reports five_hour of lane zai at 99%" in rerouted["decision_reason"]


@pytest_twisted.ensureDeferred
async def test_a_rejected_window_reroutes_until_its_reset_and_survives_a_restart(
        tmp_path, start_ccpd, make_fake):
    anthropic, zai = make_fake(), make_fake()
    zai.limit_answer = "anthropic_unified_rejected_five_hour"  # Anthropic's 429, five_hour
    zai.relative_limit_times = True
    first = await start_ccpd(anthropic.url(), zai_url=zai.url(), extra=PREEMPTIVE)
    await first.service.getServiceNamed("store-service").ready

    line = await send(first)  # held, classified, rerouted
    assert (line["lane"], line["reroute_decision"], line["limit_class"]) == \
        ("anthropic", "rerouted_limit", "window_exhausted:five_hour")
    reading = (await get_json(first.url + "/v1/usage"))["lanes"]["zai"]["provider"][
        "windows"]["five_hour"]
    assert reading["status"] == "rejected"
    reset = reading["reset_at"]
    assert 3500 < reading["reset_in_sec"] < 3610  # the fixture's reset: an hour ahead
    assert first.metric("ccp_limit_answers_total", lane="zai",
                        **{"class": "window_exhausted"}) == 1
    # until the reset, the provider's word keeps requests off the lane without asking it
    again = await send(first)
    assert (again["lane"], again["reroute_decision"]) == ("anthropic", "rerouted_quota")
    assert messages_to(zai) == 1
    await first.service.stopService()

    second = await start_ccpd(anthropic.url(), zai_url=zai.url(), extra=PREEMPTIVE)
    await second.service.getServiceNamed("store-service").ready
    kept = (await get_json(second.url + "/v1/usage"))["lanes"]["zai"]["provider"]["windows"]
    assert (kept["five_hour"]["status"], kept["five_hour"]["reset_at"]) == ("rejected", reset)
    after = await send(second)
    assert (after["lane"], after["reroute_decision"]) == ("anthropic", "rerouted_quota")
    assert messages_to(zai) == 1  # the restarted ccpd did not try the exhausted lane
    await second.service.stopService()


@pytest_twisted.ensureDeferred
async def test_hybrid_cooldown_ends_at_the_reported_reset_and_survives_a_restart(
        tmp_path, start_ccpd, make_fake):
    anthropic, zai = make_fake(), make_fake()
    zai.limit_answer = "anthropic_unified_rejected_five_hour"
    zai.relative_limit_times = True
    hybrid = "[routing]\ndefault_lane = anthropic\nreroute_mode = hybrid\ncooldown_sec = 300\n"
    first = await start_ccpd(anthropic.url(), zai_url=zai.url(), extra=hybrid)
    await first.service.getServiceNamed("store-service").ready
    line = await send(first)
    assert line["reroute_decision"] == "rerouted_limit" and line["cooldown_active"] is True
    assert 3500 < line["cooldown_next_ts"] - line["ts"] < 3610  # the reset, not 300 s
    await first.service.stopService()

    second = await start_ccpd(anthropic.url(), zai_url=zai.url(), extra=hybrid)
    await second.service.getServiceNamed("store-service").ready
    policy = (await get_json(second.url + "/v1/usage"))["models"]["glm-4.6"]["policy"]
    assert policy["cooldown_active"] is True
    assert policy["cooldown_next_ts"] == line["cooldown_next_ts"]
    await second.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_account_problem_marks_the_lane_until_it_answers_again(tmp_path, start_ccpd,
                                                                         make_fake):
    anthropic, zai = make_fake(), make_fake()
    zai.limit_answer = "zai_1113_balance"
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url())
    line = await send(ccpd)
    assert (line["lane"], line["limit_class"]) == ("anthropic", "account")
    ready = await get_json(ccpd.url + "/readyz")
    assert ready["lanes"]["zai"]["usable"] is False and ready["degraded"] is True
    assert ccpd.metric("ccp_lane_unusable", lane="zai") == 1
    assert (await send(ccpd))["decision_reason"].startswith("account: lane zai cannot serve")
    assert messages_to(zai) == 1  # (besides /readyz's probe)

    zai.limit_answer = None  # topped up; another route's request succeeds on the lane
    solo = await send(ccpd, {**GLM, "model": "glm-solo"})
    assert solo["lane"] == "zai" and ccpd.metric("ccp_lane_unusable", lane="zai") == 0
    assert (await send(ccpd))["lane"] == "zai"


@pytest_twisted.ensureDeferred
async def test_a_concurrency_limit_reroutes_once_without_a_cooldown(tmp_path, start_ccpd,
                                                                      make_fake):
    anthropic, zai = make_fake(), make_fake()
    zai.limit_answer = "zai_1302_concurrency"
    hybrid = "[routing]\ndefault_lane = anthropic\nreroute_mode = hybrid\ncooldown_sec = 300\n"
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url(), extra=hybrid)
    line = await send(ccpd)
    assert (line["lane"], line["limit_class"], line["cooldown_active"]) == \
        ("anthropic", "burst", False)
    zai.limit_answer = None
    assert (await send(ccpd))["lane"] == "zai"  # no window cooldown: zai is asked again
    view = (await get_json(ccpd.url + "/v1/usage"))["models"]["glm-4.6"]
    assert view["calibration"]["rolling"]["gap_samples"] == 0  # and no calibration sample
    solo = await post(ccpd.url + "/v1/messages", {**GLM, "model": "glm-solo"})
    zai.limit_answer = "zai_1305_overloaded"
    overloaded = await post(ccpd.url + "/v1/messages", {**GLM, "model": "glm-solo"})
    assert solo.code == 200 and overloaded.code == 429  # Z.AI's 1305 comes as a 429
    assert json.loads(await overloaded.content())["error"]["type"] == "1305"  # untouched
    assert ccpd.metric("ccp_limit_answers_total", lane="zai", **{"class": "overloaded"}) == 1


@pytest_twisted.ensureDeferred
async def test_the_providers_headers_reach_the_client_untouched(tmp_path, start_ccpd, make_fake):
    anthropic, zai = make_fake(), make_fake()
    zai.unified = {"5h": 0.5, "7d": 0.2}
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url())
    through = await post(ccpd.url + "/v1/messages", GLM)
    await through.content()
    direct = await post(zai.url() + "/v1/messages", GLM)
    await direct.content()

    def limit_headers(response):
        return {name: values for name, values in response.headers.getAllRawHeaders()
                if name.lower().startswith((b"anthropic-ratelimit-", b"retry-after"))}

    assert len(limit_headers(direct)) == 11
    assert limit_headers(through) == limit_headers(direct)

    zai.unified, zai.limit_answer = None, "anthropic_unified_rejected_five_hour"
    solo = await post(ccpd.url + "/v1/messages", {**GLM, "model": "glm-solo"})  # no secondary
    body = await solo.content()
    direct = await post(zai.url() + "/v1/messages", GLM)
    assert (solo.code, body) == (429, await direct.content())
    assert limit_headers(solo) == limit_headers(direct)  # retry-after and resets included


@pytest_twisted.ensureDeferred
async def test_a_lane_with_quota_url_is_polled_with_its_key(tmp_path, make_fake):
    from twisted.internet import reactor
    anthropic, zai = make_fake(), make_fake()
    zai.quota = {"five_hour": 37, "weekly": 12}
    text = ccpd_ini(tmp_path, anthropic.url(), zai_url=zai.url()).replace(
        "reset_tz = +08:00", "reset_tz = +08:00\nquota_url = /api/monitor/usage/quota/limit")
    service = build_service(config_from_string(text, "t.ini", environ={}), reactor,
                            {"ZAI_TEST_KEY": ZAI_SECRET})
    service.startService()
    try:
        port = (await service.web._waitingForPort).getHost().port
        evidence = service.app.governor.evidence
        await until(lambda: ("zai", "weekly") in evidence.readings)  # polled at start
        [poll] = [r for r in zai.requests if r.path == "/api/monitor/usage/quota/limit"]
        assert poll.headers["authorization"] == f"Bearer {ZAI_SECRET}"
        lane = (await get_json(f"http://127.0.0.1:{port}/v1/usage"))["lanes"]["zai"]
        windows = lane["provider"]["windows"]
        assert (windows["five_hour"]["utilization"], windows["five_hour"]["source"]) == \
            (0.37, "poll")
        assert windows["weekly"]["utilization"] == 0.12
    finally:
        await service.stopService()

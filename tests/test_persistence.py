"""Persistence end to end: history endpoints, no loss across kill -9, state that survives a
restart, and ``persist = false``.

The history endpoints run in memory on a Clock (the store then runs its SQL on the calling
thread, on a real SQLite file); restarts, ``persist = false`` and ``kill -9`` run the real
adbapi store on loopback and in ``twistd``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from ccpd.store.writer import FLUSH_DELAY_S
from tests.support import (MESSAGE, TWISTD, ccpd_ini, free_port, post, read_jsonl,
                           wait_healthy)

GLM = {**MESSAGE, "model": "glm-4.6"}
ROLLUP_INTERVAL_S = 300  # ccpd's default [store] rollup_interval


async def get_json(url: str):
    response = await treq.get(url)
    return response.code, json.loads(await response.content())


async def wait_ready(ccpd):
    await ccpd.service.getServiceNamed("store-service").ready


def test_samples_and_rollups_endpoints(memory_ccpd):
    ccpd = memory_ccpd()
    for tokens, ttft in (("10", 0.1), ("20", 0.2), ("30", 0.3)):
        sent = ccpd.send_post("/v1/messages", MESSAGE, {
            "x-fake-input-tokens": tokens, "x-fake-first-byte-ms": str(int(ttft * 1000))})
        ccpd.advance(ttft)
        assert ccpd.settle(sent).code == 200
    ccpd.advance(FLUSH_DELAY_S)  # the store's writer batches for a moment
    body = ccpd.get("/v1/usage/samples?since=0&limit=2").json()
    assert set(body) == {"models", "scope", "ts"} and body["ts"] == ccpd.clock.seconds()
    assert body["scope"] == "team"  # the default; one daemon on SQLite: the same rows
    rows = body["models"]["claude-sonnet-4-5"]
    assert [r["input_tokens"] for r in rows] == [10, 20]
    assert {"ts", "lane", "op", "input_tokens", "output_tokens", "status", "decision"} <= \
        set(rows[0])
    since = rows[1]["ts"]
    assert [r["input_tokens"] for r in ccpd.get(
        f"/v1/usage/samples?since={since}").json()["models"]["claude-sonnet-4-5"]] == [20, 30]
    assert ccpd.get("/v1/usage/samples?model=nope").json()["models"] == {}
    assert ccpd.get("/v1/usage/rollups").json()["models"] == {}  # until the roller's tick
    ccpd.advance(ROLLUP_INTERVAL_S)
    body = ccpd.get("/v1/usage/rollups?granularity=hour").json()
    [hour] = body["models"]["claude-sonnet-4-5"]
    assert body["granularity"] == "hour"
    assert (hour["count"], hour["in_tokens"], hour["out_tokens"]) == (3, 60, 15)
    assert hour["p50_ttft"] == 200 and hour["out_dirty_tps"] == 25.0  # 15 tokens in 0.6 s
    [day] = ccpd.get("/v1/usage/rollups?granularity=day").json()["models"]["claude-sonnet-4-5"]
    assert (day["count"], day["in_tokens"]) == (3, 60)
    assert ccpd.get("/v1/usage/rollups?granularity=day&model=nope").json()["models"] == {}
    assert ccpd.get("/v1/usage/rollups?scope=instance").json()["models"] == body["models"]
    [row] = ccpd.get("/v1/usage/samples?scope=instance&limit=1").json()["models"][
        "claude-sonnet-4-5"]
    assert row["instance"] == ccpd.service.config.store.instance == socket.gethostname()


@pytest.mark.parametrize("query, words", [
    ("samples?limit=0", "limit must be from 1 to 10000, not '0'"),
    ("samples?limit=10001", "limit must be from 1 to 10000"),
    ("samples?limit=many", "limit must be an integer, not 'many'"),
    ("samples?limit=2.5", "limit must be an integer"),
    ("samples?since=yesterday", "since must be a number, not 'yesterday'"),
    ("samples?since=-1", "since must be >= 0"),
    ("samples?since=nan", "since must be >= 0"),
    ("rollups?granularity=week", "granularity must be hour or day, not 'week'"),
    ("rollups?since=soon", "since must be a number"),
    ("samples?scope=all", "scope must be team or instance, not 'all'"),
])
def test_history_query_parameters_are_checked(memory_ccpd, query, words):
    ccpd = memory_ccpd()
    answer = ccpd.get(f"/v1/usage/{query}")
    assert answer.error() == (400, "invalid_request_error")
    assert words in answer.json()["error"]["message"]


def test_history_query_parameters_may_be_empty(memory_ccpd):
    ccpd = memory_ccpd()
    assert ccpd.get("/v1/usage/samples?since=&limit=&model=").code == 200
    assert ccpd.get("/v1/usage/rollups?granularity=&since=").json()["granularity"] == "hour"


@pytest_twisted.ensureDeferred
async def test_persist_false_serves_the_same_endpoints_from_memory(tmp_path, start_ccpd,
                                                                    fake_upstream):
    ccpd = await start_ccpd(fake_upstream.url(), store_extra="persist = false")
    await wait_ready(ccpd)
    await (await post(ccpd.url + "/v1/messages", MESSAGE)).content()
    await ccpd.service.getServiceNamed("store-service").writer.drained()
    code, body = await get_json(ccpd.url + "/v1/usage/samples")
    assert code == 200 and len(body["models"]["claude-sonnet-4-5"]) == 1
    assert not (tmp_path / "logs" / "ccp.sqlite3").exists()


@pytest_twisted.ensureDeferred
async def test_cooldown_and_quota_windows_survive_a_restart(tmp_path, start_ccpd, make_fake):
    (tmp_path / "quotas.json").write_text(json.dumps(
        {"models": {"glm-4.6": {"rolling_limit_tokens": 100000}}}))
    anthropic, zai = make_fake(), make_fake(limit_tokens=30)
    first = await start_ccpd(anthropic.url(), zai_url=zai.url())
    await wait_ready(first)
    await (await post(first.url + "/v1/messages", GLM, {"x-fake-input-tokens": "30"})).content()
    limited = await post(first.url + "/v1/messages", GLM)  # zai is out: rerouted, cooldown
    await limited.content()
    assert first.usage_lines()[-1]["reroute_decision"] == "rerouted_limit"
    await first.service.stopService()

    second = await start_ccpd(anthropic.url(), zai_url=zai.url())
    await wait_ready(second)
    await (await post(second.url + "/v1/messages", GLM)).content()
    assert second.usage_lines()[-1]["reroute_decision"] == "rerouted_cooldown"
    assert len(zai.requests) == 2  # the restarted ccpd did not try the cooling lane
    view = json.loads(await (await treq.get(second.url + "/v1/usage")).content())
    assert view["models"]["glm-4.6"]["rolling"]["used_tokens"] == 35  # from before the restart


@pytest_twisted.ensureDeferred
async def test_quota_windows_are_rebuilt_under_the_model_asked_for(tmp_path, start_ccpd,
                                                                   fake_upstream):
    (tmp_path / "quotas.json").write_text(json.dumps(
        {"models": {"claude-sonnet-4-5": {"rolling_limit_tokens": 1000}}}))
    first = await start_ccpd(fake_upstream.url())
    await wait_ready(first)
    dated = {"x-fake-model": "claude-sonnet-4-5-20250929", "x-fake-input-tokens": "95"}
    await (await post(first.url + "/v1/messages", MESSAGE, dated)).content()
    assert first.usage_lines()[0]["served_model"] == "claude-sonnet-4-5-20250929"
    await first.service.stopService()

    second = await start_ccpd(fake_upstream.url())
    await wait_ready(second)
    models = json.loads(await (await treq.get(second.url + "/v1/usage")).content())["models"]
    assert models["claude-sonnet-4-5"]["rolling"]["used_tokens"] == 100
    assert "claude-sonnet-4-5-20250929" not in models


@pytest_twisted.ensureDeferred
async def test_no_request_is_lost_across_kill_9(tmp_path, fake_upstream):
    port = free_port()
    config = tmp_path / "ccp.ini"
    config.write_text(ccpd_ini(tmp_path, fake_upstream.url()).replace(
        "listen = tcp:0:", f"listen = tcp:{port}:"))
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "logs" / "ccp.sqlite3"
    output = tmp_path / "twistd.out"

    def start() -> subprocess.Popen:
        with open(output, "ab") as out:
            return subprocess.Popen([TWISTD, "-n", "--pidfile=", "ccpd", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    env={**os.environ, "ZAI_TEST_KEY": "k"})

    child = start()
    try:
        await wait_healthy(url, child)
        for i in range(30):
            stream = {"stream": True} if i % 3 == 0 else {}
            response = await post(url + "/v1/messages", {**MESSAGE, **stream},
                                  {"x-fake-input-tokens": str(i + 1)})
            assert response.code == 200
            await response.content()
    finally:
        child.send_signal(signal.SIGKILL)
        await deferToThread(child.wait, 15)
    logged = {(r["ts"], r["rid"]) for r in read_jsonl(tmp_path / "logs" / "usage.jsonl")}
    assert len(logged) == 30
    # whatever the writer managed before the kill, make sure some rows are missing for real
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM usage_sample WHERE rid IN (SELECT rid FROM usage_sample "
                           "ORDER BY ts DESC LIMIT 5)")

    child = start()
    try:
        await wait_healthy(url, child)
        code, body = await get_json(url + "/v1/usage/samples?since=0&limit=10000")
    finally:
        child.send_signal(signal.SIGTERM)
        await deferToThread(child.wait, 15)
    served = {(r["ts"], r["rid"]) for rows in body["models"].values() for r in rows}
    assert code == 200 and served == logged
    with sqlite3.connect(db) as connection:
        stored = set(connection.execute("SELECT ts, rid FROM usage_sample"))
    assert stored == logged
    assert "store: recovered" in output.read_text()

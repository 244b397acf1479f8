"""Team mode: daemons sharing one PostgreSQL store (a real server, tests/pg.py) decide on the
team's usage, share cooldowns and provider readings, serve on their own view while the
database is away and catch up without loss when it returns. Two daemons run in this process
on loopback, each with its own logs; the three-daemon runs under ``twistd`` are in
tests/test_team_processes.py."""
from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
import pytest_twisted
import treq

from ccpd.config import ConfigError, config_from_string
from tests.support import MESSAGE, ccpd_ini, post, start_loopback_ccpd, until

SOLO = {**MESSAGE, "model": "glm-solo"}   # lane zai only: blocked when its plan is used up
GLM = {**MESSAGE, "model": "glm-4.6"}     # lane zai, rerouted to anthropic


def plan_limit(tokens: int) -> dict:
    return {"models": {}, "lanes": {"zai": {"rolling_window_hours": 5,
                                            "rolling_limit_tokens": tokens}}}


@pytest.fixture
def team(tmp_path, postgres, fake_upstream):
    """``await team(name, quotas=..., routing=...)``: a daemon of the team on loopback (its own
    directory under tmp_path, instance ``name``, the test's PostgreSQL database); all stopped
    after the test."""
    running = []

    async def start(name: str, quotas: dict | None = None, routing: str = "preemptive",
                    cooldown: str = "0", zai_url: str | None = None):
        home = tmp_path / name
        home.mkdir()
        (home / "quotas.json").write_text(json.dumps(quotas or {"models": {}}))
        ccpd = await start_loopback_ccpd(
            home, fake_upstream.url(), zai_url=zai_url,
            store_extra=f"url = {postgres.dsn}\ninstance = {name}",
            extra=f"[routing]\nreroute_mode = {routing}\ncooldown_sec = {cooldown}\n")
        running.append(ccpd)
        await ccpd.service.getServiceNamed("store-service").ready
        await until(lambda: ccpd.service.getServiceNamed("team-ledger").up)
        return ccpd

    yield start
    for ccpd in running:
        if ccpd.service.running:
            pytest_twisted.blockon(ccpd.service.stopService())


async def send(ccpd, body: dict, **headers: str):
    response = await post(ccpd.url + "/v1/messages", body, headers)
    return response.code, json.loads(await response.content())


async def get(ccpd, path: str):
    response = await treq.get(ccpd.url + path)
    return response.code, json.loads(await response.content())


def stored(dsn: str) -> set[tuple]:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        return set(connection.execute("SELECT instance, ts, rid FROM usage_sample"))


def readings(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        return connection.execute("SELECT lane, plan_window, status FROM provider_reading "
                                  "WHERE plan_window <> 'unified'").fetchall()


def logged(*daemons) -> set[tuple]:
    return {(ccpd.service.config.store.instance, line["ts"], line["rid"])
            for ccpd in daemons for line in ccpd.usage_lines()}


@pytest_twisted.ensureDeferred
async def test_a_daemon_decides_on_what_the_other_daemon_used(team, postgres):
    alice = await team("alice", plan_limit(1000))
    bob = await team("bob", plan_limit(1000))
    code, _ = await send(alice, SOLO, **{"x-fake-input-tokens": "1200"})
    assert code == 200
    # its sample reaches the ledger a moment after the answer ended (till then it is in flight)
    await until(lambda: stored(postgres.dsn) == logged(alice))
    # bob served nothing, but the plan is the team's: used up by alice
    code, answer = await send(bob, SOLO)
    assert code == 429 and answer["error"]["type"] == "rate_limit_error"
    assert "plan limit of lane zai" in answer["error"]["message"]
    [line] = bob.usage_lines()
    assert line["status"] == 429 and line["reroute_decision"] == "blocked"
    _, usage = await get(bob, "/v1/usage")
    assert usage["lanes"]["zai"]["counted"]["rolling"]["used_tokens"] == 1205
    assert usage["team"]["ledger"] == "shared" and usage["team"]["instance"] == "bob"
    assert usage["team"]["samples_read"] == 1 and "@" in usage["team"]["store"]
    assert bob.metric("ccp_team_ledger_up") == 1
    # the samples carry their daemon; the history shows the team or one instance
    assert stored(postgres.dsn) == logged(alice, bob)
    _, team_rows = await get(bob, "/v1/usage/samples?limit=10")
    _, own_rows = await get(bob, "/v1/usage/samples?scope=instance&limit=10")
    assert sorted(r["instance"] for rows in team_rows["models"].values() for r in rows) == \
        ["alice", "bob"]
    assert [r["instance"] for rows in own_rows["models"].values() for r in rows] == ["bob"]


@pytest_twisted.ensureDeferred
async def test_a_cooldown_one_daemon_starts_applies_to_all(team, make_fake):
    zai = make_fake(limit_tokens=0)  # answers Z.AI's limit answer
    alice = await team("alice", routing="hybrid", cooldown="10m", zai_url=zai.url())
    bob = await team("bob", routing="hybrid", cooldown="10m", zai_url=zai.url())
    code, _ = await send(alice, GLM)  # zai is out: rerouted to anthropic, zai cools down
    assert code == 200 and alice.usage_lines()[-1]["reroute_decision"] == "rerouted_limit"
    assert len(zai.requests) == 1
    code, _ = await send(bob, GLM)
    assert code == 200 and bob.usage_lines()[-1]["reroute_decision"] == "rerouted_cooldown"
    assert len(zai.requests) == 1  # bob did not try the lane alice found cooling


@pytest_twisted.ensureDeferred
async def test_a_provider_limit_one_daemon_sees_applies_to_all(team, fake_upstream, postgres):
    alice = await team("alice")
    bob = await team("bob")
    # the provider tells alice her plan's five-hour window is 99 % used (block_at: 98 %)
    code, _ = await send(alice, MESSAGE, **{"x-fake-unified": "5h=0.99,status=allowed_warning"})
    assert code == 200
    await until(lambda: ("anthropic", "five_hour", "allowed_warning") in readings(postgres.dsn))
    asked = len(fake_upstream.requests)
    code, answer = await send(bob, MESSAGE)
    assert code == 429 and "five_hour" in answer["error"]["message"]
    assert len(fake_upstream.requests) == asked  # bob did not spend a request on it


@pytest_twisted.ensureDeferred
async def test_a_daemon_serves_on_its_own_view_while_the_database_is_away(team, postgres):
    alice = await team("alice", plan_limit(100_000))
    bob = await team("bob", plan_limit(100_000))
    assert (await send(alice, SOLO))[0] == 200
    postgres.server.stop()
    for ccpd in (alice, bob, alice):
        code, _ = await send(ccpd, SOLO, **{"x-fake-input-tokens": "500"})
        assert code == 200  # served all the same
    code, ready = await get(bob, "/readyz")
    assert ready["team"]["ledger"] == "local" and ready["degraded"] is True
    code, answer = await get(bob, "/v1/usage/samples")  # the history is in the database
    assert code == 503 and answer["error"]["type"] == "api_error"
    assert "which does not answer" in answer["error"]["message"]
    assert ready["team"]["error"] and ready["team"]["local_since"] is not None
    assert ready["team"]["store"] == f"postgresql://ccpd@127.0.0.1:{postgres.port}/" \
                                     f"{postgres.name}"
    _, usage = await get(bob, "/v1/usage")
    assert usage["team"]["ledger"] == "local"
    assert bob.metric("ccp_team_ledger_up") == 0
    postgres.server.start()
    # back: every sample served meanwhile reaches the store, and bob counts alice's
    await until(lambda: all(c.service.getServiceNamed("team-ledger").up for c in (alice, bob)),
                timeout=10)
    await until(lambda: stored(postgres.dsn) == logged(alice, bob), timeout=10)
    await send(bob, SOLO, **{"x-fake-input-tokens": "1"})
    _, usage = await get(bob, "/v1/usage")
    assert usage["lanes"]["zai"]["counted"]["rolling"]["used_tokens"] == \
        sum(line["input_tokens"] + line["output_tokens"]
            for ccpd in (alice, bob) for line in ccpd.usage_lines())
    _, ready = await get(bob, "/readyz")
    assert ready["team"]["ledger"] == "shared" and ready["team"]["error"] is None


@pytest_twisted.ensureDeferred
async def test_a_daemon_started_while_the_database_is_down_serves_and_joins_later(
        tmp_path, postgres, fake_upstream):
    postgres.server.stop()
    (tmp_path / "quotas.json").write_text(json.dumps(plan_limit(100_000)))
    ccpd = await start_loopback_ccpd(tmp_path, fake_upstream.url(),
                                     store_extra=f"url = {postgres.dsn}\ninstance = carol")
    try:
        code, _ = await send(ccpd, SOLO)
        assert code == 200
        _, ready = await get(ccpd, "/readyz")
        assert ready["team"]["ledger"] == "local" and ready["degraded"] is True
        code, answer = await get(ccpd, "/v1/usage/rollups")  # answered at once, not held
        assert code == 503 and "has not answered since ccpd started" in \
            answer["error"]["message"]
        postgres.server.start()
        # tried again 1 s later, then 2 s: migrated, recovered, reading the team's usage
        await until(lambda: ccpd.service.getServiceNamed("team-ledger").up, timeout=10)
        assert stored(postgres.dsn) == logged(ccpd)  # the request served meanwhile is there
        _, usage = await get(ccpd, "/v1/usage")
        assert usage["team"]["ledger"] == "shared"
        assert usage["lanes"]["zai"]["counted"]["rolling"]["used_tokens"] == 17  # counted once
    finally:
        await ccpd.service.stopService()


def test_without_a_url_no_database_driver_is_imported(tmp_path):
    """A single workstation: SQLite, and psycopg never loaded."""
    ini = tmp_path / "ccp.ini"
    ini.write_text(ccpd_ini(tmp_path, "http://127.0.0.1:9"))
    code = ("import sys; from twisted.internet import reactor; "
            "from ccpd.config import load_config; from ccpd.tap import build_service; "
            f"s = build_service(load_config({str(ini)!r}), reactor); "
            "print(type(s.getServiceNamed('store-service').store).__name__, "
            "'psycopg' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["SQLiteStore", "False"]


@pytest.mark.parametrize("store, words", [
    ("url = mysql://u:hunter2@db/ccpd", "[store] url: must be a postgresql://"),
    ("url = postgresql://u:hunter2@db:99999/ccpd", "[store] url: must be a postgresql://"),
    ("url = postgresql://u:hunter2@db/ccpd\npersist = false", "[store] persist: must stay true"),
    ("instance = \u0007", "[store] instance: must be a printable name"),
])
def test_team_settings_are_checked_without_echoing_the_password(tmp_path, store, words):
    with pytest.raises(ConfigError) as raised:
        config_from_string(ccpd_ini(tmp_path, "http://127.0.0.1:9", store_extra=store),
                           source="t.ini", environ={})
    assert words in str(raised.value) and "hunter2" not in str(raised.value)


def test_the_url_may_come_from_the_environment(tmp_path):
    config = config_from_string(ccpd_ini(tmp_path, "http://127.0.0.1:9"), source="t.ini",
                                environ={"CCP_DB_URL": "postgresql://u:pw@db:5433/team",
                                         "CCP_INSTANCE": "laptop-7"})
    assert config.store.team and config.store.url.endswith("@db:5433/team")
    assert config.store.instance == "laptop-7"
    single = config_from_string(ccpd_ini(tmp_path, "http://127.0.0.1:9"), source="t.ini",
                                environ={})
    assert not single.store.team and single.store.url is None

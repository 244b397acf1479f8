"""Team mode with three ``twistd`` daemons on loopback, one real PostgreSQL database, one client
per daemon sending back to back, all three at once: how far past a plan's limit the team goes
(at most the requests in flight when the limit was reached: one per daemon), and that neither a
daemon killed with SIGKILL nor a database restart mid-traffic loses a sample. The figures go to
``results/team_figures.json`` (docs/STORE.md quotes them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psycopg
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from tests.support import (MESSAGE, TWISTD, ccpd_ini, free_port, post, read_jsonl,
                           wait_healthy)

SOLO = {**MESSAGE, "model": "glm-solo"}   # lane zai only: blocked when the plan is used up
ROOT = Path(__file__).resolve().parent.parent
FIGURES_FILE = ROOT / "results" / "team_figures.json"


class Daemon:
    """One ``twistd -n ccpd`` of the team: its own directory, port and instance name."""

    def __init__(self, tmp_path, name: str, upstream_url: str, dsn: str, quotas: dict):
        self.name = name
        self.home = tmp_path / name
        self.home.mkdir()
        (self.home / "quotas.json").write_text(json.dumps(quotas))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.home / "ccp.ini"
        self.config.write_text(ccpd_ini(
            self.home, upstream_url, store_extra=f"url = {dsn}\ninstance = {name}",
            extra="[routing]\nreroute_mode = preemptive\n").replace(
                "listen = tcp:0:", f"listen = tcp:{self.port}:"))
        self.child: subprocess.Popen | None = None

    async def start(self) -> None:
        with open(self.home / "twistd.out", "ab") as out:
            self.child = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "ccpd", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                env={**os.environ, "ZAI_TEST_KEY": "k"})
        await wait_healthy(self.url, self.child)
        for _ in range(1500):  # until its decisions see the team (the start-up restore done)
            ready = json.loads(await (await treq.get(self.url + "/readyz")).content())
            if ready["team"]["ledger"] == "shared":
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"{self.name}: the team ledger was not read: {ready['team']}")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(sig)
            await deferToThread(self.child.wait, 20)

    def usage_lines(self) -> list[dict]:
        return read_jsonl(self.home / "logs" / "usage.jsonl")

    def output(self) -> str:
        return (self.home / "twistd.out").read_text(errors="replace")


async def team_of_three(tmp_path, upstream_url: str, dsn: str, quotas: dict) -> list[Daemon]:
    daemons = [Daemon(tmp_path, f"d{i}", upstream_url, dsn, quotas) for i in (1, 2, 3)]
    await defer.gatherResults([defer.ensureDeferred(d.start()) for d in daemons])
    return daemons


def stored(dsn: str) -> set[tuple]:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        return set(connection.execute("SELECT instance, ts, rid FROM usage_sample"))


def logged(daemons) -> set[tuple]:
    return {(d.name, line["ts"], line["rid"]) for d in daemons for line in d.usage_lines()}


def keep_figures(name: str, figures: dict) -> None:
    kept = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
    kept[name] = figures
    FIGURES_FILE.parent.mkdir(exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")


LIMIT = 30_000        # the zai plan's rolling limit, in tokens
INPUT_TOKENS = 1_000  # per request; the fake adds 5 output tokens
REQUEST_TOKENS = INPUT_TOKENS + 5
ANSWER_MS = (15, 22, 31)  # per daemon: their requests overlap, never in step


@pytest_twisted.ensureDeferred
async def test_three_daemons_stop_at_the_team_limit_with_at_most_one_request_each_past_it(
        tmp_path, postgres, fake_upstream):
    quotas = {"models": {}, "lanes": {"zai": {"rolling_window_hours": 5,
                                              "rolling_limit_tokens": LIMIT}}}
    daemons = await team_of_three(tmp_path, fake_upstream.url(), postgres.dsn, quotas)

    async def client(daemon: Daemon, answer_ms: int) -> list[int]:
        headers = {"x-fake-input-tokens": str(INPUT_TOKENS),
                   "x-fake-first-byte-ms": str(answer_ms)}
        codes = []
        while not codes or codes[-1] == 200:
            response = await post(daemon.url + "/v1/messages", SOLO, headers)
            await response.content()
            codes.append(response.code)
            assert len(codes) < 200, "never blocked"
        return codes

    try:
        codes = await defer.gatherResults([defer.ensureDeferred(client(d, ms))
                                           for d, ms in zip(daemons, ANSWER_MS)])
    finally:
        for daemon in daemons:
            await daemon.stop()
    assert all(c[-1] == 429 and set(c[:-1]) <= {200} for c in codes), codes
    served = [line for d in daemons for line in d.usage_lines() if line["status"] == 200]
    admitted = sum(line["input_tokens"] + line["output_tokens"] for line in served)
    assert admitted == REQUEST_TOKENS * sum(len(c) - 1 for c in codes)
    # about when the limit was reached (the answer that took the team's count past it ended;
    # its sample reached the ledger a moment later), which other requests were in flight
    ends = sorted((line["ts"] + line["dirty_ms"] / 1000, line) for line in served)
    total, reached = 0, None
    for end, line in ends:
        total += line["input_tokens"] + line["output_tokens"]
        if total >= LIMIT:
            reached = end
            break
    in_flight = sum(1 for line in served
                    if line["ts"] < reached < line["ts"] + line["dirty_ms"] / 1000)
    overshoot = admitted - LIMIT
    keep_figures("exactness", {
        "limit_tokens": LIMIT, "request_tokens": REQUEST_TOKENS, "daemons": 3,
        "admitted_tokens": admitted, "overshoot_tokens": overshoot,
        "overshoot_requests": round(overshoot / REQUEST_TOKENS, 2),
        "in_flight_when_reached": in_flight, "requests_served": len(served),
        "requests_per_daemon": [len(c) - 1 for c in codes]})
    # the bound: past the limit only what was in flight when it was reached, at most one
    # request per daemon (the one that reached it included)
    assert overshoot <= 3 * REQUEST_TOKENS
    # and each daemon alone would have admitted the whole limit: 3x
    assert stored(postgres.dsn) == logged(daemons)


@pytest_twisted.ensureDeferred
async def test_no_sample_is_lost_to_a_sigkill_or_a_database_restart_mid_traffic(
        tmp_path, postgres, fake_upstream):
    daemons = await team_of_three(tmp_path, fake_upstream.url(), postgres.dsn, {"models": {}})
    running = True
    answered = {d.name: 0 for d in daemons}
    failed = {d.name: 0 for d in daemons}

    async def client(daemon: Daemon) -> None:
        while running:
            try:
                response = await post(daemon.url + "/v1/messages", SOLO,
                                      {"x-fake-first-byte-ms": "5"}, timeout=5)
                await response.content()
                answered[daemon.name] += response.code == 200
            except Exception:  # noqa: BLE001 - the daemon was killed: try until it is back
                failed[daemon.name] += 1
                await task.deferLater(reactor, 0.05, lambda: None)

    clients = [defer.ensureDeferred(client(d)) for d in daemons]
    try:
        await task.deferLater(reactor, 1.0, lambda: None)
        await daemons[1].stop(signal.SIGKILL)
        # its writer sends every sample at once: drop its newest ones from the store, as if
        # the kill had come before their write, so that the restart must recover them
        with psycopg.connect(postgres.dsn, connect_timeout=5) as connection:
            connection.execute("DELETE FROM usage_sample WHERE seq IN (SELECT seq FROM "
                               "usage_sample WHERE instance = 'd2' ORDER BY seq DESC LIMIT 5)")
        await task.deferLater(reactor, 0.5, lambda: None)
        await deferToThread(postgres.server.restart)

        await task.deferLater(reactor, 0.5, lambda: None)
        await daemons[1].start()

        await task.deferLater(reactor, 1.0, lambda: None)
    finally:
        running = False
        await defer.gatherResults(clients)
        for daemon in daemons:
            await daemon.stop()
    lines = logged(daemons)
    rows = stored(postgres.dsn)
    keep_figures("no_loss", {"usage_lines": len(lines), "stored_samples": len(rows),
                             "missing": len(lines - rows), "answered": answered,
                             "client_errors_while_killed": failed})
    assert all(answered.values()) and len(lines) >= 100
    assert rows == lines  # every line of every daemon, none twice
    assert "store: recovered 5 samples" in daemons[1].output()

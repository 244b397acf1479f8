"""Shared fixtures: a loopback fake upstream and an in-process ccpd wired to it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.internet import reactor

from ccpd.config import config_from_string
from ccpd.tap import build_service
from ccpd.testing.fakeupstream import FakeUpstream


@pytest.fixture
def make_fake():
    """Start loopback fake upstreams (``make_fake(limit_tokens=0)``); stopped after the test."""
    ports = []

    def make(**options) -> FakeUpstream:
        fake = FakeUpstream(reactor, **options)
        ports.append(fake.listen(0))
        return fake

    yield make
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def fake_upstream(make_fake):
    return make_fake()


def ccpd_ini(tmp_path, upstream_url: str, extra: str = "", zai_url: str | None = None,
             server_extra: str = "", store_extra: str = "") -> str:
    quotas = tmp_path / "quotas.json"
    if not quotas.exists():
        quotas.write_text(json.dumps({"models": {}}))
    return f"""
[server]
listen = tcp:0:interface=127.0.0.1
max_body_bytes = 65536
{server_extra}

[lane:anthropic]
base_url = {upstream_url}
idle_timeout_s = 2
connect_timeout_s = 2

[lane:zai]
base_url = {zai_url or upstream_url}/api/anthropic
auth = env:ZAI_TEST_KEY
idle_timeout_s = 2
reset_tz = +08:00

[routes]
glm-4.6 = zai, anthropic/claude-sonnet-4-5
glm-solo = zai

[quotas]
file = {quotas}

[logs]
dir = {tmp_path}/logs
max_bytes = 1048576
backups = 2

[store]
path = {tmp_path}/logs/ccp.sqlite3
{store_extra}
{extra}
"""


@dataclass
class RunningCcpd:
    service: object
    url: str
    logs_dir: str

    def usage_lines(self) -> list[dict]:
        return _read_jsonl(os.path.join(self.logs_dir, "usage.jsonl"))

    def anomaly_lines(self) -> list[dict]:
        return _read_jsonl(os.path.join(self.logs_dir, "anomaly.jsonl"))


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def start_ccpd(tmp_path):
    """Start ccpd in this process against the given upstream (``await start(url)``);
    stopped after the test."""
    running = []

    async def start(upstream_url: str, extra: str = "", environ: dict | None = None,
                    zai_url: str | None = None, server_extra: str = "",
                    store_extra: str = "") -> RunningCcpd:
        text = ccpd_ini(tmp_path, upstream_url, extra, zai_url, server_extra, store_extra)
        config = config_from_string(text, source="test.ini", environ={})
        service = build_service(config, reactor, environ if environ is not None
                                else {"ZAI_TEST_KEY": "zai-secret-key-123"})
        service.startService()
        running.append(service)
        port = await service.web._waitingForPort
        return RunningCcpd(service, f"http://127.0.0.1:{port.getHost().port}",
                           str(tmp_path / "logs"))

    yield start
    for service in running:
        pytest_twisted.blockon(service.stopService())

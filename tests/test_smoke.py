"""ccpd as a user starts it: ``twistd -n ccpd --config FILE`` in its own process, in front of
the loopback fake upstream, then stopped with SIGTERM. Also checks that no credential ends up
in anything ccpd writes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

# TWISTD and wait_healthy are imported from here by modules written before tests/support.py
from tests.support import (MESSAGE, SECRET, TWISTD, ZAI_SECRET, ccpd_ini,  # noqa: F401
                           free_port, read_jsonl, wait_healthy)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_accounts_and_stops_cleanly_without_leaking_keys(
        tmp_path, fake_upstream):
    port = free_port()
    ini = (ccpd_ini(tmp_path, fake_upstream.url())
           .replace("listen = tcp:0:", f"listen = tcp:{port}:")
           .replace("[logs]\n", "[logs]\njson_log = true\n"))
    config = tmp_path / "ccp.ini"
    config.write_text(ini)
    output = tmp_path / "twistd.out"
    env = {**os.environ, "ZAI_TEST_KEY": ZAI_SECRET}
    with open(output, "wb") as out:
        child = subprocess.Popen([TWISTD, "-n", "--pidfile=", "ccpd", "--config", str(config)],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, child)
        headers = {"content-type": "application/json", "x-api-key": SECRET,
                   "x-fake-input-tokens": "21", "x-fake-events": "6"}
        streamed = await treq.post(url + "/v1/messages", headers=headers,
                                   data=json.dumps({**MESSAGE, "stream": True}).encode())
        assert streamed.code == 200 and b"message_stop" in await streamed.content()
        glm = await treq.post(url + "/v1/messages", headers=headers,
                              data=json.dumps({**MESSAGE, "model": "glm-4.6"}).encode())
        assert glm.code == 200
        await (await treq.post(url + "/v1/messages", headers={**headers, "x-fake-status": "401"},
                               data=json.dumps(MESSAGE).encode())).content()
        ready = await treq.get(url + "/readyz")
        assert ready.code == 200
    finally:
        child.send_signal(signal.SIGTERM)
        code = await deferToThread(child.wait, 15)
    # twistd ends by re-raising the signal that stopped it, as systemd expects
    assert code == -signal.SIGTERM, output.read_text()

    logs = tmp_path / "logs"
    lines = read_jsonl(logs / "usage.jsonl")
    assert [(r["lane"], r["stream"], r["status"], r["input_tokens"], r["output_tokens"])
            for r in lines] == [("anthropic", True, 200, 21, 6), ("zai", False, 200, 21, 6),
                                ("anthropic", False, 401, 0, 0)]
    assert fake_upstream.requests[1].headers["x-api-key"] == ZAI_SECRET
    daemon_log = output.read_text()
    assert "ccpd starting" in daemon_log and "Server Shut Down" in daemon_log
    assert "Traceback" not in daemon_log and "Starting factory" not in daemon_log
    assert (logs / "ccpd.log.json").stat().st_size > 0
    for name in [output, *logs.iterdir()]:
        text = name.read_bytes()
        assert SECRET.encode() not in text and ZAI_SECRET.encode() not in text, name

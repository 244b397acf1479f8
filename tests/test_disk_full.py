"""A full disk loses nothing and tears nothing: on a real, size-limited tmpfs.

The logs directory is a tmpfs of a few MB that a filler file fills up; on a full tmpfs a
write goes in part (the rest of the last page) and then fails, which is what tore usage.jsonl
lines before. Skipped, with the reason, where mounting a tmpfs is not permitted.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task

from ccpd.config import LogsConfig
from ccpd.metrics import Metrics
from ccpd.store.writer import RETRY_MAX_S
from ccpd.recorder import SPOOL_RETRY_SECONDS, Recorder
from ccpd.usagelog import RotatingJSONLWriter


@pytest.fixture
def tiny_fs(tmp_path):
    """``tmp_path/logs`` as an 8 MB tmpfs, unmounted after the test."""
    mount = tmp_path / "logs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs",
                               str(mount)], capture_output=True, text=True, timeout=10)
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False, timeout=10)


def fill(directory) -> str:
    """Fill the filesystem of ``directory`` to the last byte; returns the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return path


def file_lines(path) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n"), "the file ends in a torn line"
    return [json.loads(line) for line in data.splitlines()]  # raises on a torn line


def test_a_line_the_disk_cannot_take_is_not_torn_and_is_written_later(tiny_fs):
    path = str(tiny_fs / "usage.jsonl")
    writer = RotatingJSONLWriter(path, 0, 1)
    assert writer.write({"n": 0})
    filler = fill(tiny_fs)
    # Lines bigger than a page: each would go in part and then fail.
    assert [writer.write({"n": n, "pad": "p" * 5000}) for n in range(1, 6)] == [False] * 5
    assert writer.spooled == 5 and "No space left" in writer.last_error
    assert [r["n"] for r in file_lines(path)] == [0]
    os.unlink(filler)
    assert writer.write({"n": 6})
    assert [r["n"] for r in file_lines(path)] == [0, 1, 2, 3, 4, 5, 6]
    assert writer.spooled == 0 and writer.last_error is None
    writer.close()


def test_the_spool_is_bounded_and_keeps_the_newest_lines(tiny_fs):
    path = str(tiny_fs / "usage.jsonl")
    writer = RotatingJSONLWriter(path, 0, 1, spool_max_bytes=10_000)
    filler = fill(tiny_fs)
    for n in range(10):
        writer.write({"n": n, "pad": "p" * 3000})
    assert (writer.spooled, writer.dropped) == (3, 7)
    os.unlink(filler)
    assert writer.flush()
    assert [r["n"] for r in file_lines(path)] == [7, 8, 9]
    writer.close()


def test_the_recorder_retries_on_its_timer_and_counts_what_failed(tiny_fs):
    clock = task.Clock()
    metrics = Metrics()
    recorder = Recorder(LogsConfig(dir=str(tiny_fs)), metrics, "hybrid", clock)
    recorder.startService()
    filler = fill(tiny_fs)
    for n in range(3):
        recorder.anomaly({"n": n, "kind": "test", "detail": "x" * 5000})
    sample = metrics.registry.get_sample_value
    assert sample("ccp_log_write_errors_total", {"log": "anomaly"}) == 3
    assert sample("ccp_log_spooled_lines", {"log": "anomaly"}) == 3
    assert recorder.log_health()["anomaly"]["ok"] is False
    clock.advance(SPOOL_RETRY_SECONDS)  # still full: still waiting, nothing torn
    assert file_lines(tiny_fs / "anomaly.jsonl") == []
    os.unlink(filler)
    clock.advance(SPOOL_RETRY_SECONDS)
    assert [r["n"] for r in file_lines(tiny_fs / "anomaly.jsonl")] == [0, 1, 2]
    assert sample("ccp_log_spooled_lines", {"log": "anomaly"}) == 0
    assert recorder.log_health()["anomaly"] == {"ok": True, "spooled": 0, "dropped": 0,
                                                "error": None}
    recorder.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_served_while_the_disk_is_full_reach_the_log_and_the_store(
        tiny_fs, fake_upstream, start_ccpd):
    # The default layout: usage.jsonl, anomaly.jsonl and the SQLite store on one disk.
    ccpd = await start_ccpd(fake_upstream.url())
    headers = {"content-type": "application/json", "x-api-key": "sk-test",
               "x-fake-events": "3"}

    async def message(n: int) -> int:
        body = {"model": "claude-x", "max_tokens": 8, "stream": n % 2 == 0,
                "messages": [{"role": "user", "content": f"request {n}"}]}
        response = await treq.post(ccpd.url + "/v1/messages", json.dumps(body).encode(),
                                   headers=headers)
        await response.content()
        return response.code

    assert [await message(n) for n in range(2)] == [200, 200]
    filler = fill(tiny_fs)
    assert [await message(n) for n in range(2, 50)] == [200] * 48  # every request answered
    lines = file_lines(tiny_fs / "usage.jsonl")  # whole lines only
    assert len(lines) < 50

    metrics = ccpd.service.app.metrics.registry
    assert metrics.get_sample_value("ccp_log_write_errors_total", {"log": "usage"}) >= 48 - len(
        lines) + 2
    ready = json.loads(await (await treq.get(ccpd.url + "/readyz")).content())
    assert ready["degraded"] is True and ready["logs"]["usage"]["ok"] is False
    assert ready["logs"]["usage"]["spooled"] == 50 - len(lines)
    assert "No space left on device" in ready["logs"]["usage"]["error"]

    os.unlink(filler)
    assert await message(50) == 200
    lines = file_lines(tiny_fs / "usage.jsonl")
    assert len(lines) == 51
    assert [line["ts"] for line in lines] == sorted(line["ts"] for line in lines)  # in order
    assert len({line["rid"] for line in lines}) == 51
    ready = json.loads(await (await treq.get(ccpd.url + "/readyz")).content())
    assert ready["degraded"] is False

    # The store retries on its own (1 s, 2 s, 4 s ... at most RETRY_MAX_S): every request
    # reaches it too, at the latest one backoff after the disk accepts writes again (the
    # longer the disk was full, e.g. on a loaded machine, the longer that backoff).
    store = ccpd.service.app.store
    for _ in range(int((RETRY_MAX_S + 5) / 0.05)):
        rows = await store.store.run(lambda cursor: cursor.execute(
            "SELECT rid FROM usage_sample").fetchall())
        if len(rows) == 51:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert {rid for (rid,) in rows} == {line["rid"] for line in lines}

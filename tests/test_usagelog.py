"""Rotating JSONL logs: rotation, torn lines, and no loss or duplication under 100 writers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from ccpd.usagelog import RotatingJSONLWriter, read_records, rotated_paths


def lines_of(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_rotates_at_max_bytes_keeping_backups(tmp_path):
    path = str(tmp_path / "usage.jsonl")
    writer = RotatingJSONLWriter(path, max_bytes=100, backups=2)
    for n in range(20):
        writer.write({"n": n, "pad": "x" * 20})  # 37-38 bytes a line: 2 lines a file
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2",
                                            "usage.jsonl.lock"]
    assert all(os.path.getsize(p) <= 100 for p in rotated_paths(path))
    # the newest lines survive, in order, oldest file first
    assert [r["n"] for r in read_records(path)] == list(range(14, 20))
    assert [r["n"] for r in lines_of(path + ".1")] == [16, 17]


def test_no_backups_starts_the_file_afresh(tmp_path):
    path = str(tmp_path / "usage.jsonl")
    writer = RotatingJSONLWriter(path, max_bytes=50, backups=0)
    for n in range(5):
        writer.write({"n": n, "pad": "x" * 20})
    assert [r["n"] for r in lines_of(path)] == [4]
    assert not os.path.exists(path + ".1")


def test_nan_and_infinity_become_null(tmp_path):
    path = str(tmp_path / "u.jsonl")
    RotatingJSONLWriter(path, 0, 1).write({"a": float("nan"), "b": [float("inf")], "c": 1.5})
    with open(path, encoding="utf-8") as f:
        assert f.read() == '{"a":null,"b":[null],"c":1.5}\n'


def test_a_removed_file_is_recreated(tmp_path):
    path = str(tmp_path / "u.jsonl")
    writer = RotatingJSONLWriter(path, 0, 1)
    writer.write({"n": 1})
    os.unlink(path)
    writer.write({"n": 2})
    assert lines_of(path) == [{"n": 2}]


def test_read_records_skips_a_torn_last_line(tmp_path):
    path = str(tmp_path / "u.jsonl")
    writer = RotatingJSONLWriter(path, 0, 1)
    writer.write({"n": 1})
    with open(path, "ab") as f:
        f.write(b'{"n": 2, "tor')
    assert list(read_records(path)) == [{"n": 1}]


_WRITERS_SCRIPT = """
import sys, threading
from ccpd.usagelog import RotatingJSONLWriter
path, proc, threads, lines = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def run(t):
    writer = RotatingJSONLWriter(path, max_bytes=4096, backups=10000)
    for n in range(lines):
        writer.write({"proc": proc, "thread": t, "n": n, "pad": "y" * 40})
    writer.close()
workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
"""


def test_100_concurrent_writers_in_4_processes_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "usage.jsonl")
    procs, threads, lines = 4, 25, 40
    children = [subprocess.Popen([sys.executable, "-c", _WRITERS_SCRIPT, path, str(p),
                                  str(threads), str(lines)]) for p in range(procs)]
    assert [child.wait(timeout=120) for child in children] == [0] * procs

    seen = [(r["proc"], r["thread"], r["n"]) for r in read_records(path)]
    expected = {(p, t, n) for p in range(procs) for t in range(threads) for n in range(lines)}
    assert len(seen) == len(expected) and set(seen) == expected
    rotated = [name for name in os.listdir(tmp_path) if name.startswith("usage.jsonl.")
               and name != "usage.jsonl.lock"]
    numbers = sorted(int(name.rsplit(".", 1)[1]) for name in rotated)
    assert len(numbers) > 10 and numbers == list(range(1, len(numbers) + 1))
    assert all(os.path.getsize(p) <= 4096 for p in rotated_paths(path))
    # each writer's own lines stay in the order it wrote them
    for p in range(procs):
        for t in range(threads):
            assert [n for (pp, tt, n) in seen if (pp, tt) == (p, t)] == list(range(lines))


def test_threads_sharing_one_writer(tmp_path):
    path = str(tmp_path / "usage.jsonl")
    writer = RotatingJSONLWriter(path, max_bytes=2048, backups=10000)
    barrier = threading.Barrier(100)

    def run(t):
        barrier.wait()
        for n in range(20):
            writer.write({"t": t, "n": n})

    workers = [threading.Thread(target=run, args=(t,)) for t in range(100)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seen = [(r["t"], r["n"]) for r in read_records(path)]
    assert sorted(seen) == [(t, n) for t in range(100) for n in range(20)]

#!/usr/bin/env python3
"""Store soak: insert latency, rollup tick time and size on disk, through the daemon's own code.

Measured against the SPEC targets (10k samples: insert p95 < 2 ms, rollup tick p95 < 100 ms,
a few MB on disk):

1. insert latency: N samples written one transaction each through ``SQLiteStore.run`` (adbapi:
   the thread hop and commit included) — the worst case; the daemon batches;
2. batched writes through ``SampleWriter`` (what the daemon does): samples per second;
3. rollup tick: ``Roller.tick`` repeated over the store, samples spread over the last hour
   (every tick re-rolls the last hour, so all of them are recomputed each time);
4. with ``--big N`` (e.g. 1000000): N samples over the last 7 days, then the regular tick and
   a full re-roll of the whole week (what a first start over an old store does).

Usage: .venv/bin/python scripts/perf/store_soak.py [--samples 10000] [--ticks 30] [--big 0]
                                                   [--json results/perf/store_soak.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from ccpd.metrics import Metrics  # noqa: E402
from ccpd.store import queries  # noqa: E402
from ccpd.store.roller import Roller  # noqa: E402
from ccpd.store.sqlite import SQLiteStore  # noqa: E402
from ccpd.store.writer import SampleWriter  # noqa: E402

MODELS = ("glm-4.6", "claude-sonnet-4-5", "claude-haiku-4-5")


def sample(ts: float, n: int) -> dict:
    return {"ts": ts, "rid": f"{n:032x}", "model": MODELS[n % 3], "lane": "zai",
            "op": "messages", "stream": True, "status": 200 if n % 50 else 429,
            "input_tokens": 1000 + n % 5000, "output_tokens": 100 + n % 900,
            "cache_read_input_tokens": n % 7 * 1000, "cache_creation_input_tokens": 0,
            "ttft_ms": 200 + n % 1500, "stream_ms": 3000 + n % 9000,
            "dirty_ms": 3500 + n % 9500, "err_type": None, "reroute_decision": "preferred",
            "reroute_mode": "hybrid", "upstream": "https://api.z.ai/api/anthropic",
            "served_model": MODELS[n % 3], "header_mode": "env"}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def summary(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p95_ms": round(pct(ms, 95), 3),
            "p99_ms": round(pct(ms, 99), 3), "max_ms": round(max(ms), 3)}


async def soak(reactor, args) -> dict:
    directory = tempfile.mkdtemp(prefix="ccpd-soak-")
    path = os.path.join(directory, "ccp.sqlite3")
    store = SQLiteStore(path, reactor)
    await store.startService()
    results = {"samples": args.samples}
    try:
        now = time.time()
        # 1. one transaction per sample
        latencies = []
        for n in range(args.samples):
            row = [queries.sample_row(sample(now - random.uniform(0, 3600), n))]
            started = time.perf_counter()
            await store.run(queries.insert_samples, row)
            latencies.append(time.perf_counter() - started)
        results["insert_single_tx"] = summary(latencies)

        # 2. batched, as the daemon writes (into a store of its own)
        batched = SQLiteStore(os.path.join(directory, "batched.sqlite3"), reactor)
        await batched.startService()
        writer = SampleWriter(batched, Metrics(), reactor)
        writer.startService()
        started = time.perf_counter()
        for n in range(args.samples):
            writer.add(sample(now - random.uniform(0, 3600), n))
        await writer.drained()
        elapsed = time.perf_counter() - started
        batched.stopService()
        results["insert_batched"] = {"n": args.samples,
                                     "samples_per_s": round(args.samples / elapsed),
                                     "per_sample_ms": round(elapsed / args.samples * 1000, 4)}

        # 3. rollup ticks
        results["rollup_tick"] = await ticks(store, reactor, args.ticks)
        await store.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        results["db_bytes"] = store.size_bytes()

        # 4. a big store
        if args.big:
            results["big"] = await big(store, reactor, args)
    finally:
        store.stopService()
    return results


async def ticks(store, reactor, count: int) -> dict:
    metrics = Metrics()
    roller = Roller(store, metrics, 300, 30, clock=reactor)
    durations = []
    for _ in range(count):
        started = time.perf_counter()
        await roller.tick()
        durations.append(time.perf_counter() - started)
    return summary(durations)


async def big(store, reactor, args) -> dict:
    now = time.time()
    rows, batch = 0, []
    started = time.perf_counter()
    for n in range(args.big):
        batch.append(queries.sample_row(sample(now - random.uniform(0, 7 * 86400 - 7200),
                                               10 ** 9 + n)))
        if len(batch) == 10000:
            rows += await store.run(queries.insert_samples, batch)
            batch = []
    rows += await store.run(queries.insert_samples, batch)
    load_s = time.perf_counter() - started
    result = {"samples": rows, "load_s": round(load_s, 1),
              "rollup_tick": await ticks(store, reactor, args.ticks)}
    started = time.perf_counter()
    await store.run(queries.roll, now - 7 * 86400, now)
    result["full_week_reroll_s"] = round(time.perf_counter() - started, 2)
    await store.run(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    result["db_bytes"] = store.size_bytes()
    return result


def report(results: dict, args) -> None:
    results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}
    print(json.dumps(results, indent=2))
    single, tick = results["insert_single_tx"], results["rollup_tick"]
    print(f"\ninsert p95 {single['p95_ms']} ms (target < 2 ms): "
          f"{'PASS' if single['p95_ms'] < 2 else 'MISS'}; rollup tick p95 {tick['p95_ms']} ms "
          f"(target < 100 ms): {'PASS' if tick['p95_ms'] < 100 else 'MISS'}; "
          f"{results['db_bytes'] / 1e6:.1f} MB for {args.samples} samples")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--big", type=int, default=0, help="also soak a store of this size")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    random.seed(7)

    async def run(reactor):
        report(await soak(reactor, args), args)

    # react() runs the reactor, then exits with 0, or 1 after printing the error
    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()

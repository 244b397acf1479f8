"""What team mode costs per request: ccpd on its SQLite store beside ccpd on a shared PostgreSQL
store (the team ledger read before every decision, every sample written at once).

Both daemons run at once (CPU 0), each in front of its own C peer upstream; a real PostgreSQL
server (started here as tests/pg.py starts it for the tests: a temporary cluster, run as an
unprivileged user when this runs as root) serves the team daemon from CPU 1 with the load
generators. Only one daemon is under load at a time. For each: added latency on one keep-alive
connection (requests alternating between the direct upstream and the two daemons), then the
C load generator's 32 connections for a fixed time: req/s, p50/p99, ccpd's CPU per request, and
PostgreSQL's (all its processes). With ``--runs N``, N rounds (the order alternating) and the
median and range of every figure.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request

try:
    import _harness as h
except ImportError:
    from . import _harness as h

sys.path.insert(0, str(h.REPO))
from tests.pg import PostgresServer, skip_reason  # noqa: E402 - after the path is set

CONNECTIONS = 32
PATHS = ("sqlite", "team")


def pin(pids, cpu: int) -> None:
    for pid in pids:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError:  # gone, or pinning not allowed here
            pass


def cpu_of(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += h.cpu_seconds(pid)
        except OSError:
            pass
    return total


async def latency(stacks: dict, requests: int, warmup: int) -> dict:
    ports = {"direct": stacks["sqlite"].direct_port,
             **{name: stack.proxy_port for name, stack in stacks.items()}}
    samples = await h.alternating(ports, requests, warmup)
    direct = h.summary_ms(samples["direct"])
    return {name: {f"added_{k}": round(h.summary_ms(samples[name])[k] - direct[k], 3)
                   for k in ("p50_ms", "p99_ms")} for name in PATHS}


def ledger_reads(stack: h.Stack) -> int:
    """How often the team daemon has read the ledger (``/v1/usage`` ``team.reads``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.proxy_port}/v1/usage") as answer:
        return json.load(answer)["team"]["reads"]


def throughput(stack: h.Stack, seconds: float, database) -> dict:
    """``database``: the PostgreSQL server whose CPU counts too, or None."""
    raw = h.build_request(stack.proxy_port)
    h.closed_loop_c(stack.proxy_port, raw, CONNECTIONS, min(2.0, seconds / 3))  # warm-up
    database_pids = database.processes() if database else []  # the pool's backends are up now
    before = cpu_of(database_pids)
    reads = ledger_reads(stack) if database else 0
    result = h.closed_loop_c(stack.proxy_port, raw, CONNECTIONS, seconds, cpu_pid=stack.ccpd.pid)
    spent = cpu_of(database_pids) - before
    if database_pids and result["requests"]:
        result["database_cpu_us_per_req"] = round(spent / result["requests"] * 1e6, 1)
        result["ledger_reads_per_req"] = round((ledger_reads(stack) - reads) /
                                               result["requests"], 3)
    return result


def measure(stacks: dict, database, seconds: float, requests: int, warmup: int,
            runs: int) -> dict:
    per_run = []
    for i in range(runs):
        run = asyncio.run(latency(stacks, requests, warmup))
        for name in (PATHS if i % 2 == 0 else PATHS[::-1]):
            run[name].update(throughput(stacks[name], seconds,
                                        database if name == "team" else None))
        per_run.append(run)
    figures = ("added_p50_ms", "added_p99_ms", "rps", "p50_ms", "p99_ms", "errors",
               "cpu_us_per_req", "database_cpu_us_per_req", "ledger_reads_per_req")
    result = {"connections": CONNECTIONS, "seconds": seconds, "runs": runs, "per_run": per_run}
    for name in PATHS:
        result[name] = {k: h.spread(r[name].get(k) for r in per_run) for k in figures}
    return result


def report(result: dict) -> None:
    print(f"\nTeam mode's cost: added latency on 1 connection, then {CONNECTIONS} connections for "
          f"{result['seconds']:g} s" + (f", {result['runs']} runs: median (range)"
                                        if result["runs"] > 1 else ""))
    keys = ("added_p50_ms", "added_p99_ms", "rps", "p99_ms", "errors", "cpu_us_per_req",
            "database_cpu_us_per_req", "ledger_reads_per_req")
    print(h.table([[name, *(h.shown(result[name][k]) for k in keys)] for name in PATHS],
                  ["store", "added p50 ms", "added p99 ms", "req/s", "p99 ms (32)", "errors",
                   "ccpd cpu_us/req", "PostgreSQL cpu_us/req", "ledger reads/req"]))


def run(quick: bool = False, no_save: bool = False, runs: int = 1) -> dict:
    reason = skip_reason()
    if reason is not None:
        raise SystemExit(f"team.py needs PostgreSQL: {reason}")
    h.pin_self()
    seconds, requests, warmup = (2.0, 300, 50) if quick else (10.0, 2000, 300)
    with PostgresServer() as server:
        pin(server.processes(), h.LOAD_CPU)  # backends forked later inherit it
        database = server.fresh_database()
        with h.Stack(upstream="cpeer") as sqlite, \
                h.Stack(upstream="cpeer",
                        store_extra=f"url = {database.dsn}\ninstance = bench") as team:
            result = measure({"sqlite": sqlite, "team": team}, server, seconds,
                             requests, warmup, runs)
    report(result)
    return h.save("team", result, quick, no_save)


if __name__ == "__main__":
    args = h.arguments(__doc__, runs=True)
    run(args.quick, args.no_save, args.runs)

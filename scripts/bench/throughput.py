"""Throughput of ccpd at 32 concurrent keep-alive connections, non-streaming, beside its floor.

The C load generator (``cpeer load``, CPU 1) keeps 32 closed-loop clients sending
POST /v1/messages back to back for a fixed time, three times over: directly to the C peer
upstream (CPU 1; this is the ceiling of upstream + load generator, which must be far above the
targets), through the in-stack floor (``floor.py``: a bare Twisted relay, CPU 0) and through ccpd
(CPU 0). ccpd and the floor are never under load at the same time. For each: requests, errors,
req/s, p50/p99 latency; for the floor and ccpd also their CPU time per request (utime + stime
from /proc over the measured phase), and the ratio ccpd / floor of those.
With ``--runs N`` it does all this N times (the order floor/ccpd alternating) and reports the
median and the range of every figure; the verdicts are on the medians.
Targets (ccpd): SPEC >= 2000 req/s with p99 < 50 ms; issue 9: >= 2500 req/s, <= 400 us of CPU
per request, CPU per request <= 1.3 x the floor's; the direct ceiling should be >= 10000 req/s.
"""
from __future__ import annotations

try:
    import _harness as h
except ImportError:
    from . import _harness as h

CONNECTIONS = 32
TARGET_RPS, TARGET_P99_MS = 2000, 50.0            # SPEC
TARGET9_RPS, TARGET9_CPU_US, TARGET9_RATIO = 2500, 400.0, 1.3  # issue 9
CEILING_RPS = 4 * TARGET9_RPS                     # what upstream + load generator must reach
PATHS = ("direct", "floor", "ccpd")
FIGURES = ("requests", "errors", "rps", "p50_ms", "p99_ms", "cpu_us_per_req")


def measure_once(stack: h.Stack, seconds: float, ccpd_first: bool) -> dict:
    ports = {"direct": (stack.direct_port, None), "floor": (stack.floor_port, stack.floor.pid),
             "ccpd": (stack.proxy_port, stack.ccpd.pid)}
    order = ("direct", "ccpd", "floor") if ccpd_first else PATHS
    run = {}
    for name in order:
        port, pid = ports[name]
        raw = h.build_request(port)
        h.closed_loop_c(port, raw, CONNECTIONS, min(2.0, seconds / 3))  # warm-up
        run[name] = h.closed_loop_c(port, raw, CONNECTIONS, seconds, cpu_pid=pid)
    floor, ccpd = run["floor"]["cpu_us_per_req"], run["ccpd"]["cpu_us_per_req"]
    run["cpu_ratio"] = round(ccpd / floor, 3) if ccpd and floor else None
    return {name: run[name] for name in (*PATHS, "cpu_ratio")}


def measure(stack: h.Stack, seconds: float, runs: int) -> dict:
    per_run = [measure_once(stack, seconds, ccpd_first=bool(i % 2)) for i in range(runs)]
    result = {"connections": CONNECTIONS, "seconds": seconds, "runs": runs, "per_run": per_run}
    for name in PATHS:
        result[name] = {k: h.spread(r[name].get(k) for r in per_run) for k in FIGURES
                        if k in per_run[0][name]}
    result["cpu_ratio"] = h.spread(r["cpu_ratio"] for r in per_run)
    c, ratio = result["ccpd"], result["cpu_ratio"]["median"]
    no_errors = all(r["ccpd"]["errors"] == 0 for r in per_run)
    result["targets"] = {"rps": TARGET_RPS, "p99_ms": TARGET_P99_MS, "issue9_rps": TARGET9_RPS,
                         "issue9_cpu_us_per_req": TARGET9_CPU_US,
                         "issue9_cpu_ratio": TARGET9_RATIO, "direct_ceiling_rps": CEILING_RPS}
    result["pass"] = {"rps": c["rps"]["median"] >= TARGET_RPS and no_errors,
                      "p99": c["p99_ms"]["median"] < TARGET_P99_MS,
                      "issue9_rps": c["rps"]["median"] >= TARGET9_RPS and no_errors,
                      "issue9_cpu": (c["cpu_us_per_req"]["median"] or 1e9) <= TARGET9_CPU_US,
                      "issue9_ratio": ratio is not None and ratio <= TARGET9_RATIO,
                      "direct_ceiling": result["direct"]["rps"]["median"] >= CEILING_RPS}
    return result


def report(result: dict) -> None:
    runs, seconds = result["runs"], result["seconds"]
    print(f"\nThroughput, non-streaming, {CONNECTIONS} keep-alive connections, {seconds:g} s"
          + (f", {runs} runs: median (range)" if runs > 1 else ""))
    rows = []
    for name in PATHS:
        r = result[name]
        rows.append([name, h.shown(r["requests"]), h.shown(r["errors"]), h.shown(r["rps"]),
                     h.shown(r["p50_ms"]), h.shown(r["p99_ms"]),
                     h.shown(r["cpu_us_per_req"]) if "cpu_us_per_req" in r else "-"])
    print(h.table(rows, ["", "requests", "errors", "req/s", "p50_ms", "p99_ms", "cpu_us/req"]))
    ok, c = result["pass"], result["ccpd"]
    print(f"ccpd CPU per request / floor's: {h.shown(result['cpu_ratio'])}")
    print(f"SPEC targets: >= {TARGET_RPS} req/s ({h.verdict(ok['rps'])}), "
          f"p99 < {TARGET_P99_MS:g} ms ({h.verdict(ok['p99'])})")
    print(f"issue 9 targets: >= {TARGET9_RPS} req/s ({h.verdict(ok['issue9_rps'])}), "
          f"<= {TARGET9_CPU_US:g} us CPU/request ({h.verdict(ok['issue9_cpu'])}), "
          f"ccpd/floor CPU <= {TARGET9_RATIO:g} ({h.verdict(ok['issue9_ratio'])})")
    if not ok["direct_ceiling"]:
        print(f"WARNING: the direct ceiling ({result['direct']['rps']['median']} req/s) is below "
              f"{CEILING_RPS} req/s: upstream + load generator may be what limits these figures")
    if c["errors"]["max"]:
        print(f"WARNING: ccpd answered with errors ({h.shown(c['errors'])})")


def run(quick: bool = False, no_save: bool = False, runs: int = 1) -> dict:
    h.pin_self()
    seconds = 2.0 if quick else 10.0
    with h.Stack(upstream="cpeer", floor=True) as stack:
        result = measure(stack, seconds, runs)
    report(result)
    return h.save("throughput", result, quick, no_save)


if __name__ == "__main__":
    args = h.arguments(__doc__, runs=True)
    run(args.quick, args.no_save, args.runs)

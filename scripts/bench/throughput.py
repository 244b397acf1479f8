"""Throughput of ccpd at 32 concurrent keep-alive connections, non-streaming.

32 closed-loop clients send POST /v1/messages back to back for a fixed time, first directly to
the fake upstream (to show the ceiling of the fake + load generator on their shared CPU), then
through ccpd. Reports requests/s and p50/p99 latency of each.
Target (through ccpd): >= 2000 req/s with p99 < 50 ms.
"""
from __future__ import annotations

import asyncio

try:
    import _harness as h
except ImportError:
    from . import _harness as h

CONNECTIONS = 32
TARGET_RPS, TARGET_P99_MS = 2000, 50.0


async def measure(stack: h.Stack, seconds: float) -> dict:
    result = {}
    for name, port in (("direct", stack.direct_port), ("proxied", stack.proxy_port)):
        raw = h.build_request(port)
        await h.closed_loop(port, raw, CONNECTIONS, min(2.0, seconds / 3))  # warm-up
        result[name] = await h.closed_loop(port, raw, CONNECTIONS, seconds)
    p = result["proxied"]
    return {"connections": CONNECTIONS, "seconds": seconds, **result,
            "targets": {"rps": TARGET_RPS, "p99_ms": TARGET_P99_MS},
            "pass": {"rps": p["rps"] >= TARGET_RPS and p["errors"] == 0,
                     "p99": p["p99_ms"] < TARGET_P99_MS}}


def run(quick: bool = False, no_save: bool = False) -> dict:
    h.pin_self()
    seconds = 2.0 if quick else 10.0
    with h.Stack() as stack:
        result = asyncio.run(measure(stack, seconds))
    print(f"\nThroughput, non-streaming, {CONNECTIONS} keep-alive connections, {seconds:g} s")
    print(h.table([[name, r["requests"], r["errors"], r["rps"], r["p50_ms"], r["p99_ms"]]
                   for name, r in ((n, result[n]) for n in ("direct", "proxied"))],
                  ["", "requests", "errors", "req/s", "p50_ms", "p99_ms"]))
    print(f"targets: >= {TARGET_RPS} req/s ({h.verdict(result['pass']['rps'])}), "
          f"p99 < {TARGET_P99_MS:g} ms ({h.verdict(result['pass']['p99'])})")
    return h.save("throughput", result, quick, no_save)


if __name__ == "__main__":
    args = h.arguments(__doc__)
    run(args.quick, args.no_save)

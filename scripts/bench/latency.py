"""Added latency of ccpd, non-streaming, one keep-alive connection.

Sends the same POST /v1/messages to the fake upstream directly and through ccpd, alternating
one direct and one proxied request (so both see the same machine state), and reports p50/p99 of
each and their differences (proxied percentile minus direct percentile).
Target: added p50 <= 0.6 ms, added p99 <= 1.5 ms.
"""
from __future__ import annotations

import asyncio

try:
    import _harness as h
except ImportError:  # imported as scripts.bench.latency
    from . import _harness as h

TARGET_P50_MS, TARGET_P99_MS = 0.6, 1.5


async def measure(stack: h.Stack, requests: int, warmup: int) -> dict:
    direct = await h.Connection.open(stack.direct_port)
    proxied = await h.Connection.open(stack.proxy_port)
    raw_direct = h.build_request(stack.direct_port)
    raw_proxied = h.build_request(stack.proxy_port)
    samples = {"direct": [], "proxied": []}
    try:
        for i in range(warmup + requests):
            for name, conn, raw in (("direct", direct, raw_direct),
                                    ("proxied", proxied, raw_proxied)):
                response = await conn.request(raw)
                if response.status != 200:
                    raise RuntimeError(f"{name} answered {response.status}: {response.body!r}")
                if i >= warmup:
                    samples[name].append(response.latency_ns)
    finally:
        direct.close()
        proxied.close()
    d, p = h.summary_ms(samples["direct"]), h.summary_ms(samples["proxied"])
    added = {"p50_ms": round(p["p50_ms"] - d["p50_ms"], 3),
             "p99_ms": round(p["p99_ms"] - d["p99_ms"], 3)}
    return {"requests": requests, "warmup": warmup, "direct": d, "proxied": p, "added": added,
            "targets": {"added_p50_ms": TARGET_P50_MS, "added_p99_ms": TARGET_P99_MS},
            "pass": {"added_p50": added["p50_ms"] <= TARGET_P50_MS,
                     "added_p99": added["p99_ms"] <= TARGET_P99_MS}}


def run(quick: bool = False, no_save: bool = False) -> dict:
    h.pin_self()
    requests, warmup = (300, 50) if quick else (2000, 300)
    with h.Stack() as stack:
        result = asyncio.run(measure(stack, requests, warmup))
    print(f"\nAdded latency, non-streaming, 1 keep-alive connection, {requests} requests each")
    print(h.table([[k, result["direct"][k], result["proxied"][k], result["added"][k]]
                   for k in ("p50_ms", "p99_ms")],
                  ["", "direct", "proxied", "added"]))
    print(f"targets: added p50 <= {TARGET_P50_MS} ms ({h.verdict(result['pass']['added_p50'])}),"
          f" added p99 <= {TARGET_P99_MS} ms ({h.verdict(result['pass']['added_p99'])})")
    return h.save("latency", result, quick, no_save)


if __name__ == "__main__":
    args = h.arguments(__doc__)
    run(args.quick, args.no_save)

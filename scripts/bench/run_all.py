"""Run every ccpd benchmark and print a summary against the SPEC targets.

Usage (from the repository root): ``.venv/bin/python scripts/bench/run_all.py [--quick]``.
Each benchmark writes results/bench/<name>.json; this writes results/bench/summary.json.
Exits 0 when every benchmark ran, whatever the verdicts.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import sse  # noqa: E402
import throughput  # noqa: E402


def rows(r: dict) -> list[list]:
    lat, thr, s, mem = r["latency"], r["throughput"], r["sse"], r["memory"]
    g100 = s["gap_100_proxied"]
    return [
        ["added latency p50 (1 conn)", f"{lat['added']['p50_ms']} ms", "<= 0.6 ms",
         lat["pass"]["added_p50"]],
        ["added latency p99 (1 conn)", f"{lat['added']['p99_ms']} ms", "<= 1.5 ms",
         lat["pass"]["added_p99"]],
        ["throughput (32 conns)", f"{thr['proxied']['rps']} req/s "
         f"(direct {thr['direct']['rps']})", ">= 2000 req/s", thr["pass"]["rps"]],
        ["p99 at 32 conns", f"{thr['proxied']['p99_ms']} ms", "< 50 ms", thr["pass"]["p99"]],
        ["added SSE TTFT p50", f"{s['ttft']['added_p50_ms']} ms", "<= 1 ms", s["pass"]["ttft"]],
        ["SSE gap - 20ms p99, 100 streams", f"{g100['added_p99_ms']} ms "
         f"(direct {s['gap_100_direct']['added_p99_ms']})", "<= 2 ms", s["pass"]["gap_100"]],
        ["SSE frames lost/reordered, bytes differing",
         f"{s['frames_lost_or_reordered']}, {s['bytes_mismatched']}", "0, 0",
         s["pass"]["fidelity"]],
        [f"RSS per idle stream (N={mem['idle_streams']['streams']})",
         f"{mem['idle_streams']['kb_per_stream']} KB", "<= 32 KB",
         mem["pass"]["kb_per_stream"]],
        ["RSS growth, 2nd load batch", f"{mem['flat_rss']['growth_batch2_kb']} KB",
         f"<= {memory.FLAT_KB} KB", mem["pass"]["flat"]],
    ]


def main() -> int:
    args = h.arguments(__doc__)
    results = {}
    for module in (latency, throughput, sse, memory):
        results[module.__name__] = module.run(args.quick, args.no_save)
    table = [[name, got, target, h.verdict(ok)] for name, got, target, ok in rows(results)]
    m = h.machine()
    print(f"\nSummary{' (quick run: not representative)' if args.quick else ''} - "
          f"{m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, "
          f"{'ccpd pinned to CPU 0, fake + load on CPU 1' if m['pinned'] else 'not pinned'}")
    print(h.table(table, ["target", "measured", "SPEC", "verdict"]))
    h.save("summary", {"rows": [dict(zip(("target", "measured", "spec", "verdict"), row))
                                for row in table]}, args.quick, args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

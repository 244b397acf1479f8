"""Run every ccpd benchmark and print a summary against the SPEC and issue 9 targets.

Usage (from the repository root):
``.venv/bin/python scripts/bench/run_all.py [--quick] [--no-save] [--runs N]``
(``--runs N``: latency and throughput repeated N times, judged on medians).
Rows named "9: ..." are issue 9's targets; "bench: direct ceiling" checks that the C peer
upstream + load generator reach at least 4x the throughput target (a WARNING otherwise).
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
    """[name, measured, target, verdict]: the SPEC targets, then issue 9's, then the ceiling."""
    lat, thr, s, mem = r["latency"], r["throughput"], r["sse"], r["memory"]
    tc, td, tf = thr["ccpd"], thr["direct"], thr["floor"]
    g100, b100 = s["gap_100_proxied"], s["ttft_100"]
    ms = lambda v: f"{v} ms"  # noqa: E731
    spec = [
        ["added latency p50 (1 conn)", ms(lat["added"]["p50_ms"]), "<= 0.6 ms",
         h.verdict(lat["pass"]["added_p50"])],
        ["added latency p99 (1 conn)", ms(lat["added"]["p99_ms"]), "<= 1.5 ms",
         h.verdict(lat["pass"]["added_p99"])],
        ["throughput (32 conns)", f"{tc['rps']['median']} req/s (floor {tf['rps']['median']})",
         ">= 2000 req/s", h.verdict(thr["pass"]["rps"])],
        ["p99 at 32 conns", ms(tc["p99_ms"]["median"]), "< 50 ms", h.verdict(thr["pass"]["p99"])],
        ["added SSE TTFT p50", ms(s["ttft"]["added_p50_ms"]), "<= 1 ms",
         h.verdict(s["pass"]["ttft"])],
        ["SSE gap - 20ms p99, 100 streams", f"{g100['added_p99_ms']} ms "
         f"(direct {s['gap_100_direct']['added_p99_ms']})", "<= 2 ms",
         h.verdict(s["pass"]["gap_100"])],
        ["SSE frames lost/reordered, bytes differing",
         f"{s['frames_lost_or_reordered']}, {s['bytes_mismatched']}", "0, 0",
         h.verdict(s["pass"]["fidelity"])],
        [f"RSS per idle stream (N={mem['idle_streams']['streams']})",
         f"{mem['idle_streams']['kb_per_stream']} KB", "<= 32 KB",
         h.verdict(mem["pass"]["kb_per_stream"])],
        ["RSS growth, 2nd load batch", f"{mem['flat_rss']['growth_batch2_kb']} KB",
         f"<= {memory.FLAT_KB} KB", h.verdict(mem["pass"]["flat"])],
    ]
    floor_added = lat["floor_added"]
    issue9 = [
        ["9: added latency p50 (1 conn)", f"{lat['added']['p50_ms']} ms "
         f"(floor {floor_added['p50_ms']['median']})", "<= 0.5 ms",
         h.verdict(lat["pass"]["issue9_added_p50"])],
        ["9: added latency p99 (1 conn)", f"{lat['added']['p99_ms']} ms "
         f"(floor {floor_added['p99_ms']['median']})", "<= 1.2 ms",
         h.verdict(lat["pass"]["issue9_added_p99"])],
        ["9: throughput (32 conns)", f"{tc['rps']['median']} req/s (floor {tf['rps']['median']})",
         ">= 2500 req/s", h.verdict(thr["pass"]["issue9_rps"])],
        ["9: ccpd CPU per request", f"{tc['cpu_us_per_req']['median']} us "
         f"(floor {tf['cpu_us_per_req']['median']})", "<= 400 us",
         h.verdict(thr["pass"]["issue9_cpu"])],
        ["9: CPU per request, ccpd / floor", f"{thr['cpu_ratio']['median']}", "<= 1.3",
         h.verdict(thr["pass"]["issue9_ratio"])],
        ["9: added TTFT p50, 100 streams together", f"{b100['ccpd_added']['p50_ms']} ms "
         f"(floor {b100['floor_added']['p50_ms']})", "<= 15 ms",
         h.verdict(s["pass"]["issue9_ttft_100_p50"])],
        ["9: added TTFT p99, 100 streams together", f"{b100['ccpd_added']['p99_ms']} ms "
         f"(floor {b100['floor_added']['p99_ms']})", "<= 40 ms",
         h.verdict(s["pass"]["issue9_ttft_100_p99"])],
        ["9: added gap p99, 100 streams (proxied - direct)",
         f"{s['issue9_gap_100_added_p99_ms']} ms", "<= 2 ms",
         h.verdict(s["pass"]["issue9_gap_100"])],
        ["9: peak RSS under load (32 conns)", f"{mem['flat_rss']['peak_rss_kb']} KB",
         f"<= {memory.TARGET9_PEAK_KB} KB", h.verdict(mem["pass"]["issue9_peak_rss"])],
    ]
    ceiling = td["rps"]["median"]
    bench = [["bench: direct ceiling (C peer, 32 conns)", f"{ceiling} req/s",
              f">= {throughput.CEILING_RPS} req/s",
              "OK" if thr["pass"]["direct_ceiling"] else "WARNING"]]
    return spec + issue9 + bench


def main() -> int:
    args = h.arguments(__doc__, runs=True)
    results = {}
    for module in (latency, throughput, sse, memory):
        extra = {"runs": args.runs} if module in (latency, throughput) else {}
        results[module.__name__] = module.run(args.quick, args.no_save, **extra)
    table = rows(results)
    m = h.machine()
    pinning = "ccpd and floor pinned to CPU 0, upstream + load on CPU 1"
    print(f"\nSummary{' (quick run: not representative)' if args.quick else ''} - "
          f"{m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, "
          f"{pinning if m['pinned'] else 'not pinned'}"
          + (f"; latency and throughput: medians of {args.runs} runs" if args.runs > 1 else ""))
    print(h.table(table, ["figure", "measured", "target", "verdict"]))
    if table[-1][-1] != "OK":
        print(f"WARNING: the direct ceiling is below {throughput.CEILING_RPS} req/s: the upstream "
              "and load generator may limit the throughput figures")
    h.save("summary", {"rows": [dict(zip(("figure", "measured", "target", "verdict"), row))
                                for row in table]}, args.quick, args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where ccpd's CPU goes per proxied request: cProfile of a real ``twistd -n ccpd`` under the
32-connection non-streaming load of scripts/bench/throughput.py (or streaming, ``--stream``).

ccpd runs under ``twistd --profile=FILE --profiler=cprofile --savestats`` in front of the
Python fake upstream; the load generator sends requests back to back for ``--seconds``; then
ccpd is stopped (SIGTERM writes the profile) and the profile is summarised into buckets:
Twisted's HTTP server, Klein/werkzeug routing, ccpd's own work and Twisted's HTTP client, by
the file each function lives in (own time), plus the top functions.

    .venv/bin/python scripts/perf/profile_proxy.py [--seconds 10] [--stream] [--top 40] [--floor]

``--floor`` profiles the in-stack floor (``scripts/bench/floor.py``) the same way, for the
comparison. Writes ``results/perf/profile-<mode>.prof`` (load it with ``python -m pstats`` or snakeviz)
and prints the tables. cProfile itself slows ccpd down about 2x: use the shares, not the
absolute times. Stdlib and the project only.
"""
from __future__ import annotations

import argparse
import asyncio
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _harness as h  # noqa: E402

OUT = h.REPO / "results" / "perf"

BUCKETS = [  # (name, path fragments); the first that matches wins
    ("ccpd: usage log + recorder", ("ccpd/recorder.py", "ccpd/usagelog.py")),
    ("ccpd: store hand-off", ("ccpd/store/",)),
    ("ccpd: usage extraction", ("ccpd/usage.py",)),
    ("ccpd: metrics (prometheus_client)", ("ccpd/metrics.py", "prometheus_client/")),
    ("ccpd: quotas/policy/governor", ("ccpd/governor.py", "ccpd/quotas.py", "ccpd/policy.py",
                                      "ccpd/evidence.py", "ccpd/watch.py", "ccpd/limits.py",
                                      "ccpd/calibration.py")),
    ("ccpd: proxy, guard, app", ("ccpd/web/", "ccpd/lanes.py", "ccpd/jsonparse.py")),
    ("json (stdlib)", ("json/",)),
    ("Klein + werkzeug routing", ("klein/", "werkzeug/")),
    ("Twisted HTTP client", ("twisted/web/client.py", "twisted/web/_newclient.py",
                             "twisted/web/iweb.py")),
    ("Twisted HTTP server", ("twisted/web/http.py", "twisted/web/server.py",
                             "twisted/web/resource.py", "twisted/web/http_headers.py",
                             "twisted/web/_abnf.py")),
    ("Twisted Deferreds", ("twisted/internet/defer.py", "twisted/python/failure.py")),
    ("Twisted reactor + transport", ("twisted/internet/", "twisted/protocols/")),
    ("twisted.logger", ("twisted/logger/",)),
    ("uuid / random", ("uuid.py", "random.py")),
]


def bucket(filename: str) -> str:
    for name, fragments in BUCKETS:
        if any(fragment in filename for fragment in fragments):
            return name
    if filename.startswith("~") or filename == "":
        return "builtins (C: socket, select, dict, str …)"
    return "other: " + "/".join(Path(filename).parts[-2:])


class ProfiledStack(h.Stack):
    """The bench stack with ccpd (or, ``floor``, the in-stack floor alone) under cProfile."""

    def __init__(self, prof: Path, floor: bool):
        super().__init__(floor=floor, ccpd=not floor)
        self.prof = prof

    def _spawn(self, cmd, cpu, log):
        if cmd and cmd[0] == h.TWISTD:
            cmd = [h.TWISTD, "-n", f"--profile={self.prof}", "--profiler=cprofile",
                   "--savestats", *cmd[2:]]
        elif str(h.FLOOR) in cmd:  # written when SIGTERM stops its reactor
            cmd = [h.PYTHON, "-m", "cProfile", "-o", str(self.prof), *cmd[1:]]
        return super()._spawn(cmd, cpu, log)

    @property
    def port(self) -> int:
        return self.floor_port if self.with_floor else self.proxy_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--floor", action="store_true",
                        help="profile the in-stack floor (scripts/bench/floor.py) instead")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    mode = ("stream" if args.stream else "json") + ("-floor" if args.floor else "")
    prof = OUT / f"profile-{mode}.prof"
    prof.unlink(missing_ok=True)
    h.pin_self()
    with ProfiledStack(prof, args.floor) as stack:
        raw = h.build_request(stack.port, h.STREAM_MESSAGE if args.stream else h.MESSAGE)
        result = asyncio.run(h.closed_loop(stack.port, raw, args.connections, args.seconds))
    h._wait_for(lambda: prof.exists() and prof.stat().st_size > 0, "profile file", 30)
    requests = result["requests"]
    stats = pstats.Stats(str(prof))
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in stats.stats.values())
    by_bucket: dict[str, float] = {}
    for (filename, _line, _name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        by_bucket[bucket(filename)] = by_bucket.get(bucket(filename), 0.0) + tt
    print(f"\n{requests} requests ({mode}) at {args.connections} connections in "
          f"{result['seconds']} s: {result['rps']} req/s under cProfile; profiled CPU "
          f"{total:.2f} s = {total / requests * 1e6:.0f} us/request (cProfile overhead "
          f"included)")
    rows = sorted(by_bucket.items(), key=lambda kv: -kv[1])
    print(h.table([[name, f"{tt:.2f}", f"{tt / total * 100:.1f}%",
                    f"{tt / requests * 1e6:.0f}"] for name, tt in rows if tt / total >= 0.002],
                  ["own time by where it lives", "s", "share", "us/req"]))
    print(f"\ntop {args.top} functions by own time:")
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
    print(h.table([[f"{Path(f).name}:{line} {name}"[:80], calls, f"{tt:.3f}",
                    f"{tt / total * 100:.1f}%", f"{ct / requests * 1e6:.0f}"]
                   for (f, line, name), (_cc, calls, tt, ct, _c) in top],
                  ["function", "calls", "own s", "share", "cum us/req"]))
    print(f"\nprofile: {prof.relative_to(h.REPO)}  "
          f"(commit {h.machine()['ccpd_commit']}; python -m pstats {prof.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

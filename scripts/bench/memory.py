"""Memory of the ccpd process: cost of an idle open stream, and RSS under sustained load.

- Per stream: VmRSS of ccpd idle (after a short warm-up), then with N streams held open
  (``x-fake-scenario: hang-after-headers``: headers and ``message_start``, then silence; the lane's
  ``idle_timeout_s`` is raised so none times out), once every stream has delivered its
  ``message_start``. KB per stream = (RSS_with - RSS_idle) / N. Target <= 32 KB.
- Flat RSS: VmRSS after a warm-up, after LOAD more requests and after LOAD more again
  (32 keep-alive connections, non-streaming). Reported, judged flat when the second batch
  grows RSS by at most FLAT_KB.
- Peak RSS under load (issue 9): ccpd's VmHWM (the most it was ever resident) once the flat-RSS
  load is over. Target <= 70 MB (71 680 KB). The peak with N idle streams held is shown too.
Both use the Python fake upstream (the idle streams need its ``hang-after-headers``).
"""
from __future__ import annotations

import asyncio
import time

try:
    import _harness as h
except ImportError:
    from . import _harness as h

TARGET_KB_PER_STREAM = 32
FLAT_KB = 1024
TARGET9_PEAK_KB = 70 * 1024  # issue 9: peak RSS under load <= 70 MB


async def settle(stack: h.Stack, seconds: float = 1.0) -> int:
    await asyncio.sleep(seconds)
    return stack.ccpd_rss_kb()


async def open_streams(stack: h.Stack, count: int) -> list[h.Connection]:
    """``count`` streams held open, each having received its first event."""
    raw = h.build_request(stack.proxy_port, h.STREAM_MESSAGE,
                          {"x-fake-scenario": "hang-after-headers"})
    conns = []
    for _ in range(count):
        conn = await h.Connection.open(stack.proxy_port)
        conn.writer.write(raw)
        conns.append(conn)

    async def first_event(conn: h.Connection) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {head[:80]!r}")
        await conn.reader.readuntil(b"\n\n")  # message_start

    await asyncio.wait_for(asyncio.gather(*(first_event(c) for c in conns)), 60)
    return conns


async def per_stream(stack: h.Stack, streams: int) -> dict:
    await h.closed_loop(stack.proxy_port, h.build_request(stack.proxy_port), 4, 60,
                        max_requests=200)
    for conn in await open_streams(stack, 5):  # warm-up of the streaming path
        conn.close()
    idle = await settle(stack, 2.0)
    conns = await open_streams(stack, streams)
    try:
        held = await settle(stack)
    finally:
        for conn in conns:
            conn.close()
    after = await settle(stack, 2.0)
    per = (held - idle) / streams
    return {"streams": streams, "rss_idle_kb": idle, "rss_with_streams_kb": held,
            "rss_after_close_kb": after, "kb_per_stream": round(per, 1),
            "peak_rss_kb": stack.ccpd_peak_rss_kb()}


async def flat(stack: h.Stack, load: int) -> dict:
    raw = h.build_request(stack.proxy_port)
    run = lambda n: h.closed_loop(stack.proxy_port, raw, 32, 3600, max_requests=n)  # noqa: E731
    await run(2000)
    marks = {"rss_after_warmup_kb": await settle(stack)}
    started = time.perf_counter()
    await run(load)
    marks["rss_after_batch1_kb"] = await settle(stack)
    await run(load)
    marks["rss_after_batch2_kb"] = await settle(stack)
    marks["seconds"] = round(time.perf_counter() - started, 1)
    marks["peak_rss_kb"] = stack.ccpd_peak_rss_kb()
    return {"requests_per_batch": load, **marks,
            "growth_batch2_kb": marks["rss_after_batch2_kb"] - marks["rss_after_batch1_kb"]}


def run(quick: bool = False, no_save: bool = False) -> dict:
    h.pin_self()
    streams, load = (100, 2000) if quick else (500, 20000)
    with h.Stack(lane_extra={"idle_timeout_s": 3600}, upstream="fake") as stack:
        result = {"idle_streams": asyncio.run(per_stream(stack, streams))}
    with h.Stack(upstream="fake") as stack:
        result["flat_rss"] = asyncio.run(flat(stack, load))
    s, f = result["idle_streams"], result["flat_rss"]
    result["targets"] = {"kb_per_stream": TARGET_KB_PER_STREAM, "flat_growth_kb": FLAT_KB,
                         "issue9_peak_rss_kb": TARGET9_PEAK_KB}
    result["pass"] = {"kb_per_stream": s["kb_per_stream"] <= TARGET_KB_PER_STREAM,
                      "flat": f["growth_batch2_kb"] <= FLAT_KB,
                      "issue9_peak_rss": f["peak_rss_kb"] <= TARGET9_PEAK_KB}
    print(f"\nccpd RSS with {streams} idle open streams")
    print(h.table([[s["rss_idle_kb"], s["rss_with_streams_kb"], s["rss_after_close_kb"],
                    s["kb_per_stream"], s["peak_rss_kb"]]],
                  ["idle_kb", f"with_{streams}_kb", "after_close_kb", "kb_per_stream",
                   "peak_kb"]))
    print(f"\nccpd RSS under load ({load} requests per batch, 32 connections)")
    print(h.table([[f["rss_after_warmup_kb"], f["rss_after_batch1_kb"],
                    f["rss_after_batch2_kb"], f["growth_batch2_kb"], f["peak_rss_kb"]]],
                  ["after_warmup_kb", "after_batch1_kb", "after_batch2_kb", "batch2_growth_kb",
                   "peak_kb"]))
    print(f"targets: <= {TARGET_KB_PER_STREAM} KB per idle stream "
          f"({h.verdict(result['pass']['kb_per_stream'])}), flat RSS: second batch grows "
          f"<= {FLAT_KB} KB ({h.verdict(result['pass']['flat'])})")
    print(f"issue 9 target: peak RSS under load <= {TARGET9_PEAK_KB} KB "
          f"({h.verdict(result['pass']['issue9_peak_rss'])})")
    return h.save("memory", result, quick, no_save)


if __name__ == "__main__":
    args = h.arguments(__doc__)
    run(args.quick, args.no_save)

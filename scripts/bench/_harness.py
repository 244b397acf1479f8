"""Shared benchmark machinery: processes, a minimal HTTP/1.1 client and statistics.

Everything here is stdlib only, plus ``gcc`` for the C peer (``cpeer.c``: a fast upstream and
load generator, built on demand into results/bench/bin/). ccpd, and the in-stack floor relay
(``floor.py``), run pinned to CPU 0; the upstream (the C peer or the Python fake) and the load
generators (this process, or the C peer's ``load`` / ``burst`` modes) share CPU 1, when
``taskset`` / ``sched_setaffinity`` and two CPUs exist. ccpd and the floor share CPU 0, so only
one of them is ever under load at a time. Processes are started in their own session and always
stopped (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
TWISTD = str(VENV_BIN / "twistd") if (VENV_BIN / "twistd").exists() else "twistd"
RESULTS = REPO / "results" / "bench"
BENCH = Path(__file__).resolve().parent
CPEER_SRC = BENCH / "cpeer.c"
CPEER_BIN = RESULTS / "bin" / "cpeer"  # results/bench/ is git-ignored
FLOOR = BENCH / "floor.py"

CCPD_CPU, LOAD_CPU = 0, 1
MESSAGE = b'{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
STREAM_MESSAGE = MESSAGE[:-1] + b',"stream":true}'


# -- machine and pinning ---------------------------------------------------------------------

def can_pin() -> bool:
    return (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")


def pin_self() -> None:
    """Move the load generator onto LOAD_CPU (shared with the upstream)."""
    if can_pin():
        os.sched_setaffinity(0, {LOAD_CPU})


def _taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if can_pin() and shutil.which("taskset") else []


def machine() -> dict:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "pinned": bool(_taskset(0)),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "ccpd_commit": _git("rev-parse", "--short", "HEAD"),
            "ccpd_tree_modified": bool(_git("status", "--porcelain", "--", "ccpd", "twisted"))}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# -- processes --------------------------------------------------------------------------------

def _wait_for(check, what: str, timeout: float = 20.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout:g}s")


def _healthy(port: int, path: str = "/healthz") -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            # ccpd answers only to a Host that names it, port included (421 otherwise)
            s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                      % (path.encode(), port))
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _port_from(path: str):
    """The port a process wrote to ``path`` (written whole: the peers write it by rename)."""
    return os.path.exists(path) and Path(path).read_text().strip()


def cpeer() -> str:
    """The C peer's binary, built from cpeer.c when missing or older than the source."""
    if CPEER_BIN.exists() and CPEER_BIN.stat().st_mtime >= CPEER_SRC.stat().st_mtime:
        return str(CPEER_BIN)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError(f"the benchmarks build their C peer ({CPEER_SRC.relative_to(REPO)}) "
                           "with gcc, which is not on PATH: install gcc (e.g. apt-get install "
                           "gcc); memory.py alone runs without it")
    CPEER_BIN.parent.mkdir(parents=True, exist_ok=True)
    tmp = CPEER_BIN.with_name(f"cpeer.{os.getpid()}.tmp")
    built = subprocess.run([gcc, "-O2", "-o", str(tmp), str(CPEER_SRC)], capture_output=True,
                           text=True)
    if built.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"gcc could not build {CPEER_SRC.relative_to(REPO)}:\n"
                           f"{built.stderr[-3000:]}")
    os.replace(tmp, CPEER_BIN)
    return str(CPEER_BIN)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def stop(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Stack:
    """An upstream (CPU 1) with ccpd and/or the floor relay in front of it (CPU 0), in a
    temporary directory.

    ``upstream``: ``"cpeer"`` (the C peer: canned JSON and SSE answers, never the bottleneck) or
    ``"fake"`` (``ccpd.testing.fakeupstream``: timed events, scenarios such as hangs).
    ``floor``: also start the in-stack floor (``floor.py``) in front of the same upstream.
    ``lane_extra``: extra ``key = value`` lines for ccpd's lane section (e.g. idle_timeout_s);
    ``store_extra``: for its ``[store]`` section (e.g. a team mode ``url``).
    """

    def __init__(self, lane_extra: dict | None = None, upstream: str = "cpeer",
                 floor: bool = False, ccpd: bool = True, store_extra: str = ""):
        if upstream not in ("cpeer", "fake"):
            raise ValueError(f"upstream {upstream!r}: cpeer or fake")
        self.lane_extra = lane_extra or {}
        self.store_extra = store_extra
        self.upstream, self.with_floor, self.with_ccpd = upstream, floor, ccpd
        self.tmp = tempfile.mkdtemp(prefix="ccpd-bench-")
        self.fake = self.ccpd = self.floor = None  # .fake: the upstream, whichever it is
        self.direct_port = self.proxy_port = self.floor_port = 0

    def __enter__(self) -> "Stack":
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in (self.ccpd, self.floor, self.fake):
            stop(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _spawn(self, cmd: list[str], cpu: int, log: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCP_")}
        with open(os.path.join(self.tmp, log), "wb") as out:
            return subprocess.Popen(_taskset(cpu) + cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                    start_new_session=True)

    def _start(self) -> None:
        port_file = os.path.join(self.tmp, "upstream.port")
        if self.upstream == "cpeer":
            cmd = [cpeer(), "serve", port_file]
        else:
            cmd = [PYTHON, "-m", "ccpd.testing.fakeupstream", "--port", "0",
                   "--port-file", port_file, "--no-record"]
        self.fake = self._spawn(cmd, LOAD_CPU, "upstream.log")
        self.direct_port = int(_wait_for(lambda: _port_from(port_file), f"{self.upstream} "
                                         "upstream", proc=self.fake))
        if self.with_floor:
            self._start_floor()
        if self.with_ccpd:
            self._start_ccpd()

    def _start_floor(self) -> None:
        port_file = os.path.join(self.tmp, "floor.port")
        self.floor = self._spawn([PYTHON, str(FLOOR), "--port-file", port_file, "--upstream",
                                  f"http://127.0.0.1:{self.direct_port}"], CCPD_CPU, "floor.log")
        self.floor_port = int(_wait_for(lambda: _port_from(port_file), "floor relay",
                                        proc=self.floor))
        # both upstreams answer GET /v1/models with 200: one relayed round trip
        _wait_for(lambda: _healthy(self.floor_port, "/v1/models"), "floor relay",
                  proc=self.floor)

    def _start_ccpd(self) -> None:
        self.proxy_port = free_port()
        quotas = os.path.join(self.tmp, "quotas.json")
        Path(quotas).write_text('{"models": {}}')
        lane = "".join(f"{k} = {v}\n" for k, v in self.lane_extra.items())
        config = os.path.join(self.tmp, "ccp.ini")
        Path(config).write_text(
            f"[server]\nlisten = tcp:{self.proxy_port}:interface=127.0.0.1\n"
            f"[lane:anthropic]\nbase_url = http://127.0.0.1:{self.direct_port}\n{lane}"
            f"[routing]\ndefault_lane = anthropic\n"
            f"[quotas]\nfile = {quotas}\n"
            f"[logs]\ndir = {os.path.join(self.tmp, 'logs')}\n"
            f"[store]\npath = {os.path.join(self.tmp, 'ccp.sqlite3')}\n{self.store_extra}\n")
        self.ccpd = self._spawn([TWISTD, "-n", "--pidfile=", "ccpd", "--config", config],
                                CCPD_CPU, "ccpd.log")
        try:
            _wait_for(lambda: _healthy(self.proxy_port), "ccpd /healthz", proc=self.ccpd)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; ccpd log:\n{self.ccpd_log()[-2000:]}") from None

    def ccpd_log(self) -> str:
        return Path(self.tmp, "ccpd.log").read_text(errors="replace")

    def log(self, name: str) -> str:
        """The output of ``ccpd``, ``floor`` or ``upstream``."""
        return Path(self.tmp, f"{name}.log").read_text(errors="replace")

    def ccpd_rss_kb(self) -> int:
        return rss_kb(self.ccpd.pid)

    def ccpd_peak_rss_kb(self) -> int:
        return rss_kb(self.ccpd.pid, "VmHWM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """Resident set of ``pid`` in KB: now (VmRSS) or its peak so far (``field="VmHWM"``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


# -- HTTP/1.1 client ----------------------------------------------------------------------------

def build_request(port: int, body: bytes = MESSAGE, headers: dict | None = None,
                  path: str = "/v1/messages") -> bytes:
    """The bytes of one keep-alive POST; built once and sent many times."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/json", "x-api-key: bench",
             "anthropic-version: 2023-06-01", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes
    sent_ns: int
    done_ns: int
    events: list = field(default_factory=list)  # [(arrival_ns, event_bytes)] for SSE

    @property
    def latency_ns(self) -> int:
        return self.done_ns - self.sent_ns


class Connection:
    """One keep-alive HTTP/1.1 connection; SSE events are timestamped as they complete."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()

    async def request(self, raw: bytes) -> Response:
        sent = time.perf_counter_ns()
        self.writer.write(raw)
        return await self.read_response(sent)

    async def read_response(self, sent: int) -> Response:
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split(b" ", 2)[1])
        events: list = []
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            parts, pending = [], b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                chunk = (await reader.readexactly(size + 2))[:-2]
                parts.append(chunk)
                if sse:
                    now = time.perf_counter_ns()
                    pending += chunk
                    *complete, pending = pending.split(b"\n\n")
                    events.extend((now, event) for event in complete)
            body = b"".join(parts)
        else:
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        return Response(status, headers, body, sent, time.perf_counter_ns(), events)


async def closed_loop(port: int, raw: bytes, connections: int, seconds: float,
                      max_requests: int | None = None) -> dict:
    """``connections`` clients each sending ``raw`` back to back for ``seconds``."""
    conns = [await Connection.open(port) for _ in range(connections)]
    latencies: list[int] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    budget = [max_requests if max_requests is not None else float("inf")]

    async def client(conn: Connection) -> None:
        nonlocal errors
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            response = await conn.request(raw)
            if response.status != 200:
                errors += 1
            latencies.append(response.latency_ns)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in conns))
    finally:
        elapsed = time.perf_counter() - start
        for c in conns:
            c.close()
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "rps": round(len(latencies) / elapsed, 1), **summary_ms(latencies)}


async def alternating(ports: dict[str, int], requests: int, warmup: int) -> dict[str, list[int]]:
    """Latency (ns) of ``requests`` POST /v1/messages on one keep-alive connection to each of
    ``ports`` (name -> port), one request on each in turn, after ``warmup`` rounds: all paths
    see the same machine state. A non-200 answer stops the run."""
    conns = {name: await Connection.open(port) for name, port in ports.items()}
    raws = {name: build_request(port) for name, port in ports.items()}
    samples: dict[str, list[int]] = {name: [] for name in ports}
    try:
        for i in range(warmup + requests):
            for name in ports:
                response = await conns[name].request(raws[name])
                if response.status != 200:
                    raise RuntimeError(f"{name} answered {response.status}: {response.body!r}")
                if i >= warmup:
                    samples[name].append(response.latency_ns)
    finally:
        for conn in conns.values():
            conn.close()
    return samples


def _run_cpeer(mode: str, port: int, raw: bytes, connections: int, amount, timeout: float):
    with tempfile.NamedTemporaryFile(prefix="ccpd-bench-request-") as request:
        request.write(raw)
        request.flush()
        done = subprocess.run(_taskset(LOAD_CPU) + [cpeer(), mode, str(port), str(connections),
                                                    str(amount), request.name],
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"cpeer {mode} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def closed_loop_c(port: int, raw: bytes, connections: int, seconds: float,
                  cpu_pid: int | None = None) -> dict:
    """:func:`closed_loop` by the C load generator (pinned to LOAD_CPU): ``connections``
    keep-alive connections each sending ``raw`` back to back for ``seconds``; latency per
    request, send to last body byte. With ``cpu_pid``, also the CPU that process spent over the
    run: ``cpu_s`` and ``cpu_us_per_req`` (its whole CPU time, divided by the requests)."""
    before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    result = _run_cpeer("load", port, raw, connections, seconds, seconds + 60)
    if cpu_pid:
        spent = cpu_seconds(cpu_pid) - before
        result["cpu_s"] = round(spent, 3)
        result["cpu_us_per_req"] = (round(spent / result["requests"] * 1e6, 1)
                                    if result["requests"] else None)
    return result


def burst_c(port: int, raw: bytes, connections: int, waves: int) -> dict:
    """``waves`` times (after one warm-up wave), ``connections`` keep-alive connections each send
    ``raw`` (a streaming request) at the same moment (C peer, LOAD_CPU). Per request: TTFT (send
    to the first complete ``content_block_delta`` event) as p50_ms/p99_ms/max_ms, and send to
    the end of the answer as complete_p50_ms/...; ``streams`` counted, ``errors``."""
    return _run_cpeer("burst", port, raw, connections, waves, 120 + waves * 60)


# -- statistics and output ----------------------------------------------------------------------

def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(ns_values) -> dict:
    if not ns_values:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": round(percentile(ns_values, 50) / 1e6, 3),
            "p99_ms": round(percentile(ns_values, 99) / 1e6, 3),
            "max_ms": round(max(ns_values) / 1e6, 3)}


def spread(values) -> dict:
    """Median and range of the figures of several runs (None values left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values)}


def shown(s: dict, unit: str = "") -> str:
    """``median`` alone, or ``median (min-max)`` over several runs."""
    def num(v) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:.6g}"
    if s["median"] is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{num(s['median'])}{unit}"
    return f"{num(s['median'])}{unit} ({num(s['min'])}-{num(s['max'])})"


def arguments(doc: str, runs: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-seconds smoke run")
    parser.add_argument("--no-save", action="store_true", help="do not write results/bench/")
    if runs:
        parser.add_argument("--runs", type=int, default=1, metavar="N",
                            help="repeat the measurement N times; report medians and ranges")
    return parser.parse_args()


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(name: str, result: dict, quick: bool, no_save: bool = False) -> dict:
    result = {"benchmark": name, "quick": quick, "machine": machine(), **result}
    if not no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{name}{'-quick' if quick else ''}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path.relative_to(REPO)}")
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"

#!/usr/bin/env python3
"""Capture ``fixtures/usage/ccc_usage_with_speeds.json``: a ``GET /v1/usage`` body from a real
ccpd (``twistd -n ccpd --config FILE`` in its own process) in front of two loopback fake
upstreams (``python -m ccpd.testing.fakeupstream``).

- the ``zai`` fake is started with ``--limit-tokens 1700``: once it has served 1,700 tokens it
  answers every request with Z.AI's 1308 limit answer (reset 30 minutes after its clock);
- the ``anthropic`` fake sends Anthropic's unified utilisation headers
  (``anthropic-ratelimit-unified-*``: 5h 0.42, 7d 0.10, status allowed) on every answer. It
  is the same program (``ccpd.testing.fakeupstream``'s ``main``) with ``fake.unified`` set, run
  by this script with ``--anthropic-fake``; the headers are set on that fake rather than sent
  as ``x-fake-unified`` on the requests because ccpd forwards client headers to every lane and
  reads unified headers from any lane's answer, so the Z.AI lane would report them too;
- ccpd: quota ``glm-4.6`` rolling 2,000 / weekly 20,000 tokens, warn 0.8, route
  ``glm-4.6 = zai, anthropic/claude-sonnet-4-5``, reroute mode ``hybrid``; logs and store in
  a temporary directory, listening on a free loopback port;
- traffic: 12 streamed ``glm-4.6`` requests, one after the other, of 150 input / 40 output
  tokens with 15 ms between events; then ``GET /v1/usage``.

Usage (from the repository root)::

    .venv/bin/python scripts/capture_usage_fixture.py                # print the JSON
    .venv/bin/python scripts/capture_usage_fixture.py fixtures/usage/ccc_usage_with_speeds.json

What each request did (lane, status, decision; from ccpd's usage.jsonl) goes to stderr.
Stdlib and the project only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd") if (BIN / "twistd").exists() else "twistd"

ZAI_KEY = "zai-capture-key"
CLIENT_KEY = "sk-ant-capture-client"
UNIFIED = {"5h": 0.42, "7d": 0.1}  # what the anthropic fake reports on every answer
QUOTAS = {"models": {"glm-4.6": {"rolling_window_hours": 5, "rolling_limit_tokens": 2000,
                                 "weekly_limit_tokens": 20000, "warn_pct": 0.8}}}
REQUESTS = 12
HEADERS = {"content-type": "application/json", "x-api-key": CLIENT_KEY,
           "anthropic-version": "2023-06-01",
           "x-fake-input-tokens": "150", "x-fake-events": "40", "x-fake-interval-ms": "15"}
BODY = json.dumps({"model": "glm-4.6", "max_tokens": 64, "stream": True,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:g}s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Capture:
    def __init__(self, directory: Path):
        self.dir = directory
        self.procs: list[subprocess.Popen] = []
        # this environment without CCP_* overrides (they would override the config)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CCP_")}
        self.env["ZAI_CAPTURE_KEY"] = ZAI_KEY

    def spawn(self, command: list[str], log: str, cwd: Path = REPO
              ) -> tuple[subprocess.Popen, Path]:
        path = self.dir / log
        with open(path, "wb") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=cwd, env=self.env)
        self.procs.append(proc)
        return proc, path

    def fake(self, name: str, *options: str) -> int:
        port_file = self.dir / f"{name}.port"
        if name == "anthropic":
            command = [sys.executable, str(Path(__file__).resolve()), "--anthropic-fake"]
        else:
            command = [sys.executable, "-m", "ccpd.testing.fakeupstream"]
        proc, log = self.spawn([*command, "--port", "0", "--port-file", str(port_file),
                                *options], f"{name}-fake.log")
        return int(wait_for(lambda: port_file.exists() and port_file.read_text().strip(),
                            f"the {name} fake", proc, log))

    def run(self) -> dict:
        zai = self.fake("zai", "--limit-tokens", "1700")
        anthropic = self.fake("anthropic")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        quotas = self.dir / "quotas.json"
        quotas.write_text(json.dumps(QUOTAS))
        config = self.dir / "ccp.ini"
        config.write_text(f"""\
[server]
listen = tcp:{port}:interface=127.0.0.1

[lane:anthropic]
base_url = http://127.0.0.1:{anthropic}

[lane:zai]
base_url = http://127.0.0.1:{zai}/api/anthropic
auth = env:ZAI_CAPTURE_KEY
reset_tz = +08:00

[routes]
glm-4.6 = zai, anthropic/claude-sonnet-4-5

[routing]
default_lane = anthropic
reroute_mode = hybrid

[quotas]
file = {quotas}

[logs]
dir = {self.dir}/logs

[store]
path = {self.dir}/logs/ccp.sqlite3
""")
        # in the temporary directory, so that nothing of the checkout (results/ of the
        # calibration probe) is read
        ccpd, log = self.spawn([TWISTD, "-n", "--pidfile=", "ccpd", "--config", str(config)],
                               "twistd.out", cwd=self.dir)
        wait_for(lambda: self.healthy(url), "ccpd", ccpd, log)
        for n in range(1, REQUESTS + 1):
            request = urllib.request.Request(url + "/v1/messages", data=BODY, headers=HEADERS,
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    status, body = answer.status, answer.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            if status != 200 or b"message_stop" not in body:
                raise RuntimeError(f"request {n}: HTTP {status}: {body[:500]!r}")
        with urllib.request.urlopen(url + "/v1/usage", timeout=10) as answer:
            usage = json.load(answer)
        self.report(log)
        return usage

    @staticmethod
    def healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def report(self, ccpd_log: Path) -> None:
        """What each request did, from usage.jsonl, on stderr."""
        lines = self.dir / "logs" / "usage.jsonl"
        if lines.exists():
            for n, line in enumerate(lines.read_text().splitlines(), 1):
                r = json.loads(line)
                print(f"request {n:2}: {r.get('lane')}/{r.get('upstream_model')} "
                      f"HTTP {r.get('status')}, {r.get('input_tokens')} in / "
                      f"{r.get('output_tokens')} out, {r.get('reroute_decision') or 'preferred'}"
                      + (f" ({r['decision_reason']})" if r.get("decision_reason") else ""),
                      file=sys.stderr)
        if "Traceback" in ccpd_log.read_text(errors="replace"):
            print(f"ccpd's log has a traceback:\n{ccpd_log.read_text(errors='replace')}",
                  file=sys.stderr)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def anthropic_fake(argv: list[str]) -> int:
    """``python -m ccpd.testing.fakeupstream`` with ``fake.unified`` set on the fake it builds."""
    sys.path.insert(0, str(REPO))  # also without the project installed
    from ccpd.testing import fakeupstream

    class UnifiedFake(fakeupstream.FakeUpstream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.unified = dict(UNIFIED)

    fakeupstream.FakeUpstream = UnifiedFake
    return fakeupstream.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--anthropic-fake"]:
        return anthropic_fake(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="write the JSON here (default: print it)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, store, config) and name it")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="ccpd-usage-capture-"))
    capture = Capture(directory)
    try:
        usage = capture.run()
    finally:
        capture.close()
        if args.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    text = json.dumps(usage, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

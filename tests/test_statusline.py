"""``ccp statusline``: the line for Claude Code's status line, from the captured /v1/usage
fixture, and the real command (the installed console script) as a subprocess fed Claude
Code-shaped JSON on stdin, against tiny stdlib servers on 127.0.0.1: one serving the fixture,
a closed port, one that accepts and never answers, one that dribbles its answer."""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ccpd.cli.statusline import (Unavailable, fetch_usage, format_statusline, parse_args,
                             read_session, session_model, short_duration)
from tests.support import free_port

FIXTURE = Path(__file__).parent.parent / "fixtures" / "usage" / "ccc_usage_with_speeds.json"
CCP = Path(sys.executable).parent / "ccp"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def session(model: str | None = "glm-4.6", **extra) -> bytes:
    """Claude Code's status-line JSON (the shape it pipes to the command)."""
    doc = {"hook_event_name": "Status", "session_id": "abc123",
           "transcript_path": "/home/u/.claude/projects/x/abc123.jsonl", "cwd": "/x",
           "model": {"id": model, "display_name": "GLM 4.6"},
           "workspace": {"current_dir": "/x", "project_dir": "/x"}, "version": "1.0.80",
           "output_style": {"name": "default"},
           "cost": {"total_cost_usd": 0.0123, "total_duration_ms": 45000,
                    "total_api_duration_ms": 2300, "total_lines_added": 156,
                    "total_lines_removed": 23},
           "exceeds_200k_tokens": False, **extra}
    if model is None:
        del doc["model"]
    return json.dumps(doc).encode()


@pytest.fixture
def body() -> dict:
    return json.loads(FIXTURE.read_text())


# --------------------------------------------------------------------------- the line

def test_rerouted_model_in_cooldown(body):
    # glm-4.6: zai answered 1308, its five_hour is rejected; hybrid cools the model down until
    # the reported reset (the same moment, so "resets" is not repeated)
    assert format_statusline(body, "glm-4.6") == (
        "zai ↪ anthropic · BLOCK · used 5h 85% · provider 5h 100% · cooldown 30m")


def test_model_on_its_preferred_lane(body):
    # no limit of ccpd's own: the provider's figure and when its tighter window resets
    assert format_statusline(body, "claude-sonnet-4-5") == (
        "anthropic · provider 5h 42% · resets 1h00m")


def test_model_ccpd_does_not_know(body):
    assert format_statusline(body, "claude-opus-4-1-20250805") == "default lane · no quota"
    body["default_lane"] = "anthropic"          # should /v1/usage ever name it
    assert format_statusline(body, "claude-opus-4-1-20250805") == "anthropic · no quota"
    del body["default_lane"]
    body["lanes"] = {"anthropic": body["lanes"]["anthropic"]}   # a single lane: that one
    assert format_statusline(body, "claude-opus-4-1-20250805") == "anthropic · no quota"


def test_without_a_model_a_summary(body):
    assert format_statusline(body, None) == "ccpd · glm-4.6 BLOCK"
    body["models"]["glm-4.6"]["state"] = "ok"
    assert format_statusline(body, None) == "ccpd · ok"


def test_warn_on_the_preferred_lane(body):
    m = body["models"]["glm-4.6"]
    m.update(state="warn", warn=True, block=False, provider={
        "five_hour": {"utilization": 0.37, "reset_in_sec": 4320, "status": "allowed",
                      "fresh": True}})
    m["policy"].update(cooldown_active=False, cooldown_remaining_sec=0)
    # ccpd's count (85 % of 5h) is the tighter window: its reset (18051 s) is the one shown
    assert format_statusline(body, "glm-4.6") == (
        "zai · WARN · used 5h 85% · provider 5h 37% · resets 5h01m")


def test_weekly_window_is_tighter(body):
    m = body["models"]["glm-4.6"]
    m.update(state="ok", warn=False, block=False, provider={})
    m["policy"].update(cooldown_active=False, cooldown_remaining_sec=0)
    m["rolling"].update(used_tokens=200, headroom_pct=90.0)
    m["weekly"].update(used_tokens=19000, headroom_pct=5.0)
    body["lanes"]["zai"]["provider"]["windows"] = {}
    assert format_statusline(body, "glm-4.6") == "zai · used 7d 95% · resets 7d1h"


def test_block_without_reroute(body):
    m = body["models"]["glm-4.6"]
    m["policy"].update(cooldown_active=False, cooldown_remaining_sec=0)
    # run2cap sends to the preferred lane until it answers with a limit
    m["policy"]["mode"] = "run2cap"
    assert format_statusline(body, "glm-4.6").startswith("zai · BLOCK · ")
    # no secondary lane: nowhere to go
    m["policy"].update(mode="hybrid", secondary=None)
    assert format_statusline(body, "glm-4.6") == (
        "zai · BLOCK · used 5h 85% · provider 5h 100% · resets 30m")


def test_unusable_lane(body):
    m = body["models"]["glm-4.6"]
    m.update(state="ok", warn=False, block=False, provider={})
    m["policy"].update(cooldown_active=False, cooldown_remaining_sec=0)
    body["lanes"]["zai"].update(usable=False, unusable_reason="account 1113")
    body["lanes"]["zai"]["provider"]["windows"] = {}
    assert format_statusline(body, "glm-4.6") == (
        "zai ↪ anthropic · zai unusable (account 1113) · used 5h 85% · resets 5h01m")


def test_provider_figures_of_the_lane_when_the_model_has_none(body):
    m = body["models"]["claude-sonnet-4-5"]
    m["provider"] = {}
    assert format_statusline(body, "claude-sonnet-4-5") == (
        "anthropic · provider 5h 42% · resets 1h00m")


def test_colours_and_no_colour(body):
    plain = format_statusline(body, "glm-4.6", colour=False)
    coloured = format_statusline(body, "glm-4.6", colour=True)
    assert not ANSI.search(plain)
    assert "\x1b[31mBLOCK\x1b[0m" in coloured and "\x1b[36m↪ anthropic\x1b[0m" in coloured
    assert ANSI.sub("", coloured) == plain


def test_percentages_round_down():
    from ccpd.cli.statusline import _pct
    assert [_pct(f) for f in (0.29, 0.855, 0.9996, 1.0, 1.5, 0.0)] == [
        "29%", "85%", "99%", "100%", "150%", "0%"]


@pytest.mark.parametrize("body_", [{}, {"models": None}, {"models": {"glm-4.6": None}},
                                   {"models": {"glm-4.6": {"policy": 3, "rolling": "x",
                                                           "provider": [1]}}}])
def test_odd_bodies_never_raise(body_):
    line = format_statusline(body_, "glm-4.6")
    assert line and "\n" not in line and line == line.strip()


@pytest.mark.parametrize("seconds, shown", [
    (0, "0s"), (45, "45s"), (59.2, "1m"), (60, "1m"), (1797, "30m"), (3599, "1h00m"),
    (4320, "1h12m"), (18051, "5h01m"), (86399, "1d0h"), (431999, "5d0h"), (None, None),
    (-5, None), ("12", None)])
def test_short_duration(seconds, shown):
    assert short_duration(seconds) == shown


def test_session_json():
    r, w = os.pipe()
    os.write(w, session("glm-4.6", extra_field={"nested": [1, 2]}))
    os.close(w)
    with os.fdopen(r, "rb") as stream:
        assert session_model(read_session(stream)) == "glm-4.6"
    for raw in (b"", b"not json", b"[1,2]", b'{"model": 7}', b'{"model": {"id": ""}}',
                b"\xff\xfe", b"[" * 5000):
        r, w = os.pipe()
        os.write(w, raw)
        os.close(w)
        with os.fdopen(r, "rb") as stream:
            assert session_model(read_session(stream)) is None
    assert session_model({"model": "glm-4.6"}) == "glm-4.6"


def test_stdin_that_never_closes_is_not_waited_for():
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb") as stream:
            started = time.monotonic()
            assert read_session(stream, timeout=0.2) == {}
            assert time.monotonic() - started < 1.0
    finally:
        os.close(w)


def test_parse_args():
    assert parse_args([]) == {"url": None, "timeout": 0.4, "model": None, "colour": None}
    assert parse_args(["--url", "http://h:1", "--timeout=0.3", "--no-color"]) == {
        "url": "http://h:1", "timeout": 0.3, "model": None, "colour": False}
    assert parse_args(["--model", "glm-4.6", "--color"])["model"] == "glm-4.6"
    for odd in (["--help"], ["-h"], ["--bogus"], ["--url"], ["--timeout", "x"],
                ["--timeout", "0"]):
        assert parse_args(odd) is None


# --------------------------------------------------------------------------- servers

class UsageServer:
    """A stdlib HTTP server on 127.0.0.1 answering GET /v1/usage with ``body``."""

    def __init__(self, body: bytes, status: int = 200):
        self.body, self.status, self.paths = body, status, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.paths.append(self.path)
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def usage_server():
    server = UsageServer(FIXTURE.read_bytes())
    yield server
    server.close()


def run_statusline(url: str, stdin: bytes | None = None, *args: str, env_extra=None,
                   timeout: float = 30):
    """The installed ``ccp statusline`` as Claude Code runs it: JSON on stdin, a pipe for
    stdout. Returns (completed process, seconds it took)."""
    assert CCP.exists(), f"console script {CCP} not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k not in ("CCP_URL", "NO_COLOR")}
    env.update(CCP_URL=url, **(env_extra or {}))
    started = time.monotonic()
    proc = subprocess.run([str(CCP), "statusline", *args], input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, env=env)
    return proc, time.monotonic() - started


def out_line(proc) -> str:
    text = proc.stdout.decode("utf-8")
    assert text.endswith("\n") and text.count("\n") == 1, text   # one line
    line = text[:-1]
    assert line == line.rstrip(), "trailing spaces"
    return line


# --------------------------------------------------------------------------- the command

def test_command_against_a_daemon(usage_server):
    proc, _ = run_statusline(usage_server.url, session("glm-4.6"), env_extra={"NO_COLOR": "1"})
    assert proc.returncode == 0 and proc.stderr == b""
    assert out_line(proc) == (
        "zai ↪ anthropic · BLOCK · used 5h 85% · provider 5h 100% · cooldown 30m")
    assert usage_server.paths == ["/v1/usage"]

    proc, _ = run_statusline(usage_server.url, session("claude-sonnet-4-5"),
                             env_extra={"NO_COLOR": "1"})
    assert out_line(proc) == "anthropic · provider 5h 42% · resets 1h00m"

    proc, _ = run_statusline(usage_server.url, session("claude-opus-4-1-20250805"),
                             env_extra={"NO_COLOR": "1"})
    assert out_line(proc) == "default lane · no quota"


def test_command_colours_by_default_and_respects_no_color(usage_server):
    proc, _ = run_statusline(usage_server.url, session("glm-4.6"))
    coloured = out_line(proc)
    assert ANSI.search(coloured)
    assert ANSI.sub("", coloured) == (
        "zai ↪ anthropic · BLOCK · used 5h 85% · provider 5h 100% · cooldown 30m")
    proc, _ = run_statusline(usage_server.url, session("glm-4.6"), "--no-color")
    assert not ANSI.search(out_line(proc))
    proc, _ = run_statusline(usage_server.url, session("glm-4.6"), "--color",
                             env_extra={"NO_COLOR": "1"})
    assert ANSI.search(out_line(proc))


def test_command_url_option_and_model_option(usage_server):
    proc, _ = run_statusline("http://127.0.0.1:1", b"", "--url", usage_server.url,
                             "--model", "claude-sonnet-4-5", "--no-color")
    assert out_line(proc) == "anthropic · provider 5h 42% · resets 1h00m"


@pytest.mark.parametrize("stdin", [None, b"", b"garbage{", session(None), b"[]"])
def test_command_without_usable_stdin(usage_server, stdin):
    proc, _ = run_statusline(usage_server.url, stdin, "--no-color")
    assert proc.returncode == 0 and proc.stderr == b""
    assert out_line(proc) == "ccpd · glm-4.6 BLOCK"


def test_command_when_ccpd_is_not_running():
    proc, took = run_statusline(f"http://127.0.0.1:{free_port()}", session(), "--no-color")
    assert (proc.returncode, out_line(proc), proc.stderr) == (0, "ccpd: not running", b"")
    assert took < 1.5


@pytest.mark.parametrize("dribble", [False, True], ids=["silent", "dribbling"])
def test_command_when_ccpd_hangs(dribble):
    server = RawServer(_DRIBBLED if dribble else None, linger=True, dribble=dribble)
    try:
        proc, took = run_statusline(server.url, session(), "--no-color")
    finally:
        server.close()
    assert (proc.returncode, out_line(proc), proc.stderr) == (0, "ccpd: not answering", b"")
    assert took < 1.5, f"took {took:.2f}s"


def test_command_when_stdin_never_closes(usage_server):
    """A caller that keeps stdin open: the line still comes, within the stdin wait."""
    env = {k: v for k, v in os.environ.items() if k not in ("CCP_URL", "NO_COLOR")}
    env["CCP_URL"] = usage_server.url
    started = time.monotonic()
    proc = subprocess.Popen([str(CCP), "statusline", "--no-color"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b'{"model": {"id": "glm-4.6"')   # never finished, never closed
        proc.stdin.flush()
        proc.wait(timeout=10)
        took = time.monotonic() - started
        out = proc.stdout.read().decode()
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0 and out == "ccpd · glm-4.6 BLOCK\n"
    assert took < 1.5


@pytest.mark.parametrize("status, payload, line", [
    (500, b'{"type":"error","error":{"type":"api_error","message":"x"}}', "ccpd: HTTP 500"),
    (200, b"<html>hello</html>", "ccpd: unexpected answer"),
    (200, b"[1, 2]", "ccpd: unexpected answer"),
    (200, b'{"models": [1]}', "ccpd: unexpected answer"),
    (200, b'{"status": "ok"}', "ccpd: unexpected answer"),
])
def test_command_when_ccpd_answers_oddly(status, payload, line):
    server = UsageServer(payload, status)
    try:
        proc, _ = run_statusline(server.url, session(), "--no-color")
    finally:
        server.close()
    assert (proc.returncode, out_line(proc), proc.stderr) == (0, line, b"")


def test_command_with_a_bad_url():
    proc, _ = run_statusline("nonsense://x", session(), "--no-color")
    assert (proc.returncode, out_line(proc)) == (0, "ccpd: bad URL")


def test_help_goes_through_argparse():
    proc, _ = run_statusline("http://127.0.0.1:1", b"", "--help")
    assert proc.returncode == 0
    assert b"statusLine" in proc.stdout and b"--timeout" in proc.stdout


def test_fetch_deadline_is_total():
    """The deadline covers the whole exchange: a daemon sending a byte every 50 ms (each
    read succeeds well within a per-read timeout) is still cut off at the deadline."""
    server = RawServer(_DRIBBLED, linger=True, dribble=True)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="ccpd: not answering"):
            fetch_usage(server.url, timeout=0.3)
        assert time.monotonic() - started < 0.6
    finally:
        server.close()


def test_statusline_path_stays_lean(usage_server):
    """What ``ccp statusline`` loads: the standard library only -- no Twisted, no argparse,
    no rich, no store modules."""
    code = ("import sys\n"
            "from ccpd.cli import main\n"
            f"main(['statusline', '--url', {usage_server.url!r}, '--no-color'])\n"
            "sys.stderr.write(' '.join(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], input=session(), capture_output=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("zai ↪ anthropic")
    loaded = set(proc.stderr.decode().split())
    heavy = {"twisted", "zope", "klein", "treq", "rich", "argparse", "sqlite3",
             "urllib.request", "ccpd.cli.db",
             "ccpd.store",
             "ccpd.quotas", "ccpd.cli.rich_view"}
    assert not loaded & heavy, loaded & heavy


def test_statusline_time_is_measured(usage_server):
    """Not a pass/fail threshold: prints how long the real command takes (``pytest -s`` or
    ``-rP`` shows it) against a live server and with no daemon."""
    times = {}
    for name, url in (("live", usage_server.url), ("no daemon", f"http://127.0.0.1:{free_port()}")):
        runs = sorted(run_statusline(url, session(), "--no-color")[1] for _ in range(7))
        times[name] = runs
    for name, runs in times.items():
        print(f"ccp statusline ({name}): median {statistics.median(runs) * 1000:.0f} ms, "
              f"min {runs[0] * 1000:.0f} ms, max {runs[-1] * 1000:.0f} ms over {len(runs)} runs")


def test_fixture_unchanged_by_formatting(body):
    before = copy.deepcopy(body)
    format_statusline(body, "glm-4.6", colour=True)
    assert body == before


# --------------------------------------------------------------------------- the HTTP client

class RawServer:
    """A socket that reads each connection's request and answers it with ``answer`` (bytes),
    then closes the connection or (``linger``) keeps it open -- for answers an HTTP server
    would not send. ``answer=None``: never answers (a daemon that hangs); ``dribble``: one
    byte of ``answer`` every 50 ms."""

    def __init__(self, answer: bytes | None = None, linger: bool = False,
                 dribble: bool = False):
        self.answer, self.linger, self.dribble, self.requests = answer, linger, dribble, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            conn.settimeout(2)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            self.requests.append(request)
            if self.answer is None:
                return
            if self.dribble:
                for byte in self.answer:
                    if self.stop.wait(0.05):
                        return
                    conn.sendall(bytes([byte]))
            else:
                conn.sendall(self.answer)
            if not self.linger:
                conn.close()
        except OSError:
            pass

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


_DRIBBLED = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000


def test_keep_alive_chunked_and_until_close_answers():
    # an HTTP/1.1 server that keeps the connection open: Content-Length ends the answer
    for answer, linger in (
            (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: 13\r\nConnection: keep-alive\r\n\r\n{\"models\":{}}", True),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\n{\"mod\r\n9;ext=1\r\nels\": {}}\r\n0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\n\r\n{\"models\": {}}", False)):
        server = RawServer(answer, linger=linger)
        try:
            started = time.monotonic()
            assert fetch_usage(f"http://127.0.0.1:{server.port}", timeout=2) == {"models": {}}
            assert time.monotonic() - started < 1.0
            request = server.requests[0].decode()
        finally:
            server.close()
        assert request.startswith("GET /v1/usage HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in request


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",         # cut short
    b"HTTP/1.1 200 OK\r\nContent-Le",                               # no end of headers
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",                                 # not HTTP
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
])
def test_broken_answers_are_said_so_calmly(answer):
    server = RawServer(answer)
    try:
        with pytest.raises(Unavailable, match=r"^ccpd: (unreachable|unexpected answer)$"):
            fetch_usage(f"http://127.0.0.1:{server.port}", timeout=2)
    finally:
        server.close()


@pytest.mark.parametrize("url", ["nonsense://x", "127.0.0.1:8787", "http://", "http://h:x",
                                 "http://h:0", "http://h:70000", "ftp://h"])
def test_a_bad_url_is_said_so(url):
    with pytest.raises(Unavailable, match="ccpd: bad URL"):
        fetch_usage(url)


def test_command_over_https(tmp_path, body):
    """An https:// URL (ccpd behind TLS): the certificate is checked against the system's
    trust store, here a self-signed one named by SSL_CERT_FILE."""
    import datetime
    import ipaddress
    import ssl
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ccpd test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = UsageServer(json.dumps(body).encode())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    https = server.url.replace("http://", "https://")
    try:
        proc, _ = run_statusline(https, session("glm-4.6"), "--no-color",
                                 env_extra={"SSL_CERT_FILE": str(cert_file)})
        assert out_line(proc) == (
            "zai ↪ anthropic · BLOCK · used 5h 85% · provider 5h 100% · cooldown 30m")
        # without trusting that certificate: refused, calmly
        proc, _ = run_statusline(https, session("glm-4.6"), "--no-color",
                                 env_extra={"SSL_CERT_FILE": str(tmp_path / "none.pem")})
        assert (proc.returncode, out_line(proc)) == (0, "ccpd: unreachable")
    finally:
        server.close()

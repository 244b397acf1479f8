"""``ccp status``: the formatting on sample /v1/usage bodies, and the command against a tiny
stdlib HTTP server standing in for the daemon (no reactor needed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ccpd.cli import format_status, human_tokens, main, use_colour
from tests.support import free_port

FIXTURES = Path(__file__).parent / "fixtures_cli"
ANSI = "\x1b["


@pytest.fixture
def body() -> dict:
    return json.loads((FIXTURES / "usage_two_models.json").read_text())


def rows(text: str) -> dict[str, list[str]]:
    """The table rows of ``ccp status`` output, keyed by model name, split into cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    out = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        out[cells[0]] = cells[1:]
    return out


def header_cells(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("MODEL"))


# --------------------------------------------------------------------------- pure formatting

@pytest.mark.parametrize("n, shown", [
    (0, "0"), (900, "900"), (999, "999"), (1000, "1k"), (1234, "1.2k"), (40_000, "40k"),
    (350_000, "350k"), (999_950, "1M"), (1_650_000, "1.6M"), (3_400_000, "3.4M"),
    (20_000_000, "20M"), (2_500_000_000, "2.5B"), (None, "-"), ("12", "-"), (True, "-"),
])
def test_human_tokens(n, shown):
    assert human_tokens(n) == shown


def test_rows_show_used_limit_headroom_state_and_calibration(body):
    text = format_status(body)
    glm = rows(text)["glm-4.6"]
    # rolling used/limit, headroom, weekly used/limit, headroom, state, warn, gap p50/p95, samples
    assert glm == ["1.6M/2M", "17.5%", "1.6M/20M", "91.8%", "WARN", "80%→74%",
                   "-420s", "60s", "7", "-", "-"]


def test_model_without_limit_shows_used_only_and_dashes(body):
    sonnet = rows(format_status(body))["claude-sonnet-4-5"]
    # no limit: just the used count; headroom and gaps unknown; calibration not trusted yet
    assert sonnet == ["900", "-", "900", "-", "OK", "80%?", "-", "-", "0", "-", "-"]


def test_rows_sorted_by_model_name_and_header_line(body):
    text = format_status(body, url="http://127.0.0.1:9999")
    assert list(rows(text)) == ["claude-sonnet-4-5", "glm-4.6"]
    first = text.splitlines()[0]
    assert "http://127.0.0.1:9999" in first
    assert "reroute hybrid" in first
    assert "cooldown 300s" in first
    assert header_cells(text).split()[:2] == ["MODEL", "ROLLING"]
    assert "ROLLING 5h" in header_cells(text)
    assert "team" not in first  # single mode: nothing about a team


def test_header_says_whether_decisions_see_the_team(body):
    shared = {**body, "team": {"instance": "alice", "ledger": "shared", "error": None}}
    assert "|  team alice: shared  |" in format_status(shared).splitlines()[0]
    away = {**body, "team": {"instance": "alice", "ledger": "local",
                             "error": "connection refused"}}
    assert "team alice: OWN VIEW (connection refused)" in format_status(away).splitlines()[0]


def test_block_state_and_colours(body):
    body["models"]["glm-4.6"]["state"] = "block"
    body["models"]["glm-4.6"]["block"] = True
    plain = format_status(body, colour=False)
    assert rows(plain)["glm-4.6"][4] == "BLOCK"
    assert ANSI not in plain

    coloured = format_status(body, colour=True)
    assert "\x1b[31mBLOCK" in coloured          # red
    assert "\x1b[33m" not in coloured           # nothing is WARN now
    assert "\x1b[0m" in coloured
    body["models"]["glm-4.6"]["state"] = "warn"
    assert "\x1b[33mWARN" in format_status(body, colour=True)   # yellow
    # OK is never painted
    assert not any(ANSI in line for line in format_status(body, colour=True).splitlines()
                   if line.startswith("claude-sonnet-4-5"))
    # colour codes do not shift the columns after STATE
    plain_line = next(x for x in plain.splitlines() if x.startswith("glm-4.6"))
    col_line = next(x for x in coloured.splitlines() if x.startswith("glm-4.6"))
    assert col_line.replace("\x1b[31m", "").replace("\x1b[0m", "") == plain_line


def test_state_falls_back_to_flags(body):
    m = body["models"]["glm-4.6"]
    del m["state"]
    m["block"] = True
    assert rows(format_status(body))["glm-4.6"][4] == "BLOCK"
    m["block"] = False
    assert rows(format_status(body))["glm-4.6"][4] == "WARN"


def test_warn_column_variants(body):
    m = body["models"]["glm-4.6"]
    m["warn_pct_auto"] = 0.8
    assert rows(format_status(body))["glm-4.6"][5] == "80%"
    m["warn_pct_auto"] = None
    assert rows(format_status(body))["glm-4.6"][5] == "80%"
    m["warn_pct_auto"] = 0.745
    m["min_samples_reached"] = False
    assert rows(format_status(body))["glm-4.6"][5] == "80%→74.5%?"


def test_speeds_columns_only_with_speeds(body):
    without = format_status(body)
    assert "TTFT" not in without and "52.3" not in without
    text = format_status(body, speeds=True)
    head = header_cells(text)
    for title in ("REQS", "OUT t/s STREAM", "OUT t/s TOTAL", "TTFT p50"):
        assert title in head
    assert rows(text)["glm-4.6"][-4:] == ["41", "52.3", "31.0", "640ms"]
    assert rows(text)["claude-sonnet-4-5"][-4:] == ["2", "80.1", "44.0", "300ms"]


def test_provider_figures_and_the_lanes_section(body):
    glm = body["models"]["glm-4.6"]
    glm["provider"] = {"five_hour": {"utilization": 0.85}, "seven_day": {"utilization": 0.3}}
    body["lanes"] = {
        "zai": {"usable": True, "provider": {"windows": {"five_hour": {
            "utilization": 0.85, "reset_in_sec": 4320, "source": "headers", "age_sec": 12,
            "status": "allowed_warning"}}},
            "learned_limits": {"five_hour": {"tokens": 2100000, "samples": 12,
                                             "confidence": 0.8}}},
        "anthropic": {"usable": False, "unusable_reason": "account 1113",
                      "provider": {"windows": {}}, "learned_limits": {}},
        "quiet": {"usable": True, "provider": {"windows": {}}, "learned_limits": {}}}
    text = format_status(body)
    assert rows(text)["glm-4.6"][-2:] == ["85%", "30%"]
    lanes = text.split("lanes (what the providers report):\n", 1)[1].splitlines()
    assert lanes == [
        "anthropic: UNUSABLE: account 1113",
        "zai: five_hour 85%, resets in 1h12m (headers, 12s ago); learned limit five_hour 2.1M "
        "tokens (confidence 0.80, 12 samples)"]


def test_debug_quota_section(body):
    assert "cooldown ends" not in format_status(body)
    policy = body["models"]["glm-4.6"]["policy"]
    ends = time.time() + 120
    policy.update(cooldown_active=True, cooldown_next_ts=ends, cooldown_remaining_sec=120,
                  overshoot_at=ends - 300, last_decision="rerouted",
                  last_reason="rolling headroom below predicted need")
    text = format_status(body, debug=True)
    glm = text[text.index("\nglm-4.6\n"):]
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ends))
    assert "cooldown:        ACTIVE, 120s left" in glm
    assert f"cooldown ends:   {local} (in 2m00s)" in glm
    assert "overshoot at:    " + time.strftime("%Y-%m-%d %H:%M:%S",
                                                time.localtime(ends - 300)) in glm
    assert "last decision:   rerouted (reason: rolling headroom below predicted need)" in glm
    assert "predicted need:  40k tokens (40000)" in glm
    sonnet = text[text.index("\nclaude-sonnet-4-5\n"):text.index("\nglm-4.6\n")]
    assert "cooldown:        inactive" in sonnet
    assert "cooldown ends:   -" in sonnet
    assert "predicted need:  450 tokens" in sonnet


def test_no_models_seen_yet(body):
    body["models"] = {}
    text = format_status(body, speeds=True, debug=True)
    assert "no models seen yet" in text
    assert "MODEL" not in text
    body["models"] = None
    assert "no models seen yet" in format_status(body)


def test_missing_and_odd_fields_print_dashes():
    body = {"models": {"x": {}, "y": {"rolling": "weird", "speeds": None, "policy": 3,
                                      "gap_samples": None, "state": None}}}
    text = format_status(body, speeds=True, debug=True)
    assert rows(text)["x"] == ["-"] * 15
    assert rows(text)["y"] == ["-"] * 15
    assert "reroute -" in text and "cooldown -" in text


def test_hour_limited_window_shows_hours(body):
    rolling = body["models"]["glm-4.6"]["rolling"]
    rolling.update(limit_tokens=None, limit_hours=5, used_hours=0.42)
    assert rows(format_status(body))["glm-4.6"][0] == "0.42h/5h"


def test_use_colour_needs_a_tty_and_no_NO_COLOR():
    class Tty:
        def isatty(self):
            return True

    class Pipe:
        def isatty(self):
            return False

    assert use_colour(Tty(), environ={}) is True
    assert use_colour(Tty(), environ={"NO_COLOR": "1"}) is False
    assert use_colour(Pipe(), environ={}) is False


# --------------------------------------------------------------------------- against a server

class FakeDaemon:
    """A ThreadingHTTPServer answering GET /v1/usage with a settable status and body."""

    def __init__(self):
        self.status = 200
        self.body = b"{}"
        self.paths: list[str] = []
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                daemon.paths.append(self.path)
                status, payload = ((daemon.status, daemon.body) if self.path == "/v1/usage"
                                   else (404, b'{"type":"error","error":{"type":"not_found_error",'
                                               b'"message":"no such route"}}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def daemon(body):
    d = FakeDaemon()
    d.body = json.dumps(body).encode()
    yield d
    d.close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_status_end_to_end(daemon, capsys):
    assert main(["status", "--url", daemon.url]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert daemon.paths == ["/v1/usage"]
    assert daemon.url in out.splitlines()[0]
    table = rows(out)
    assert table["glm-4.6"][:5] == ["1.6M/2M", "17.5%", "1.6M/20M", "91.8%", "WARN"]
    assert table["claude-sonnet-4-5"][:5] == ["900", "-", "900", "-", "OK"]
    assert ANSI not in out          # captured stdout is not a terminal


def test_status_speeds_and_debug_end_to_end(daemon, capsys):
    assert main(["status", "--speeds", "--debug-quota", "--url", daemon.url + "/"]) == 0
    out = capsys.readouterr().out
    assert "TTFT p50" in out and "640ms" in out
    assert "last decision:   preferred" in out
    assert daemon.paths == ["/v1/usage"]   # trailing slash in --url does not double up


def test_status_url_from_environment(daemon, capsys, monkeypatch):
    monkeypatch.setenv("CCP_URL", daemon.url)
    assert main(["status"]) == 0
    assert "glm-4.6" in capsys.readouterr().out


def test_status_json_round_trips(daemon, body, capsys):
    assert main(["status", "--json", "--url", daemon.url]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == body
    assert out.startswith("{\n  \"cooldown_sec\": 300,")     # pretty, keys sorted


def test_console_script(daemon):
    script = Path(sys.executable).parent / "ccp"
    assert script.exists(), f"console script {script} not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "CCP_URL"}
    proc = subprocess.run([str(script), "status", "--url", daemon.url], capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert list(rows(proc.stdout)) == ["claude-sonnet-4-5", "glm-4.6"]
    assert "WARN" in proc.stdout and ANSI not in proc.stdout

    proc = subprocess.run([str(script), "status", "--url", closed_port_url()],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert "no ccpd answering" in proc.stderr and "Traceback" not in proc.stderr


def test_daemon_not_running(capsys):
    url = closed_port_url()
    assert main(["status", "--url", url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (f"ccp: no ccpd answering at {url} "
                           f"(is it running? start it with: make run)")


def test_unusable_url(capsys):
    assert main(["status", "--url", "nonsense://x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "ccp: cannot use daemon URL 'nonsense://x': unknown url type: nonsense"


def test_http_error_status(daemon, capsys):
    daemon.status = 500
    daemon.body = b'{"type":"error","error":{"type":"api_error","message":"usage store broken"}}'
    assert main(["status", "--url", daemon.url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == f"ccp: {daemon.url}/v1/usage answered HTTP 500: usage store broken"


def test_http_error_without_anthropic_body(daemon, capsys):
    daemon.status = 503
    daemon.body = b""
    assert main(["status", "--url", daemon.url]) == 2
    err = capsys.readouterr().err
    assert f"{daemon.url}/v1/usage answered HTTP 503" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("payload, says", [
    (b"<html>hello</html>", "did not answer JSON"),
    (b"[1, 2, 3]", "not a usage report"),
    (b'{"status": "ok"}', "not a usage report"),
    (b'{"models": [1]}', "\"models\" is not an object"),
])
def test_unexpected_body(daemon, capsys, payload, says):
    daemon.body = payload
    assert main(["status", "--url", daemon.url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert says in err and err.startswith("ccp: ") and "Traceback" not in err


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: ccp" in err and "status" in err


def test_unknown_option_is_usage_error(capsys):
    assert main(["status", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_status_help_exits_zero(capsys):
    assert main(["status", "--help"]) == 0
    assert "--debug-quota" in capsys.readouterr().out


# --------------------------------------------------------------------------- --watch, terminals

SGR_COLOUR = re.compile(r"\x1b\[(?:[0-9]+;)*(?:3[0-8]|9[0-7])(?:;[0-9]+)*m")


def test_watch_option_parsing():
    from ccpd.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["status"]).watch is None
    assert parse(["status", "--watch"]).watch == 2.0
    assert parse(["status", "--watch", "5"]).watch == 5.0
    assert parse(["status", "--watch", "--speeds"]).speeds is True


@pytest.mark.parametrize("argv, says", [
    (["status", "--watch", "0"], "between 0.1 and 86400"),
    (["status", "--watch", "soon"], "not a number of seconds"),
    (["status", "--watch", "--json"], "not allowed with argument"),
])
def test_watch_option_errors(capsys, argv, says):
    assert main(argv) == 2
    assert says in capsys.readouterr().err


class PtyProcess:
    """The installed ``ccp`` on a pseudo-terminal (a terminal of 160x50), its output read."""

    def __init__(self, args: list[str], env_extra=None):
        import fcntl
        import pty
        import signal
        import struct
        import termios

        script = Path(sys.executable).parent / "ccp"
        assert script.exists(), f"console script {script} not installed (pip install -e .)"
        try:
            self.master, slave = pty.openpty()
        except OSError as e:  # a sandbox without /dev/ptmx
            pytest.skip(f"no pseudo-terminal here: {e}")
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        # the terminal's size and kind, not the runner's overrides (rich reads these)
        skip = ("CCP_URL", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE",
                "TTY_INTERACTIVE", "COLORTERM", "JUPYTER_COLUMNS", "JUPYTER_LINES")
        env = {k: v for k, v in os.environ.items() if k not in skip}
        env.update(TERM="xterm-256color", **(env_extra or {}))
        # SIGINT as a terminal delivers it: whatever the test runner's own disposition
        self.proc = subprocess.Popen(
            [str(script), *args], stdin=slave, stdout=slave, stderr=slave, env=env,
            close_fds=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(slave)
        self.output = b""

    def read_until(self, done, timeout: float = 20) -> bool:
        """Read until ``done(output)`` or EOF or ``timeout``; whether ``done`` came true."""
        import select
        deadline = time.monotonic() + timeout
        while not done(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.master], [], [], min(left, 0.1))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    return done(self.output)
                self.output += chunk
        return True

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def _interrupt_and_wait(pty_proc) -> int:
    import signal
    pty_proc.proc.send_signal(signal.SIGINT)
    pty_proc.read_until(lambda out: False, timeout=3)  # drain until EOF (or 3 s)
    return pty_proc.proc.wait(10)


def test_watch_refreshes_in_place_on_a_terminal_until_ctrl_c(daemon):
    p = PtyProcess(["status", "--watch", "0.2", "--url", daemon.url])
    try:
        assert p.read_until(lambda out: b"refresh 2 " in out), p.text()
        assert len(daemon.paths) >= 2
        code = _interrupt_and_wait(p)
        text = p.text()
    finally:
        p.close()
    assert code in (0, 130)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.count("glm-4.6") >= 2               # drawn once per refresh...
    assert "\x1b[1A" in text and "\x1b[2K" in text  # ...over the previous one (cursor up, erase)
    assert "WARN" in text and "1.6M/2M" in text and "Ctrl-C to quit" in text
    assert SGR_COLOUR.search(text)                  # a terminal gets colours
    assert text.rstrip().endswith("\x1b[?25h")      # the cursor is given back


def test_watch_without_colour_when_NO_COLOR(daemon):
    p = PtyProcess(["status", "--watch", "0.2", "--url", daemon.url], {"NO_COLOR": "1"})
    try:
        assert p.read_until(lambda out: b"refresh 2 " in out), p.text()
        code = _interrupt_and_wait(p)
        text = p.text()
    finally:
        p.close()
    assert code in (0, 130) and "Traceback" not in text
    assert "WARN" in text and not SGR_COLOUR.search(text)


def test_watch_goes_on_when_a_refresh_fails(daemon):
    p = PtyProcess(["status", "--watch", "0.2", "--url", daemon.url])
    try:
        assert p.read_until(lambda out: b"refresh 1 " in out), p.text()
        daemon.status, daemon.body = 500, b'{"error": {"message": "store broken"}}'
        assert p.read_until(lambda out: b"store broken" in out), p.text()
        assert p.proc.poll() is None                 # still watching
        code = _interrupt_and_wait(p)
    finally:
        p.close()
    assert code in (0, 130)


def test_status_on_a_terminal_is_a_rich_table(daemon):
    p = PtyProcess(["status", "--speeds", "--url", daemon.url])
    try:
        p.read_until(lambda out: False, timeout=20)   # until it exits
        code = p.proc.wait(10)
        text = p.text()
    finally:
        p.close()
    assert code == 0 and "Traceback" not in text
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "TTFT" in plain and "640ms" in plain    # at 160 columns titles may wrap
    glm = next(line for line in plain.splitlines() if line.startswith("glm-4.6"))
    assert glm.split()[:5] == ["glm-4.6", "1.6M/2M", "17.5%", "1.6M/20M", "91.8%"]
    assert "\x1b[33mWARN" in text                   # the state in colour
    # --plain: what a pipe gets, on a terminal too
    p = PtyProcess(["status", "--plain", "--url", daemon.url], {"NO_COLOR": "1"})
    try:
        p.read_until(lambda out: False, timeout=20)
        p.proc.wait(10)
        text = p.text().replace("\r\n", "\n")
    finally:
        p.close()
    body = json.loads(daemon.body)
    assert text.rstrip("\n").endswith(format_status(body, url=daemon.url).splitlines()[-1])
    assert header_cells(text) == header_cells(format_status(body))


def test_watch_piped_prints_each_refresh_as_plain_text(daemon):
    import signal
    script = Path(sys.executable).parent / "ccp"
    env = {k: v for k, v in os.environ.items() if k not in ("CCP_URL", "NO_COLOR")}
    proc = subprocess.Popen([str(script), "status", "--watch", "0.2", "--url", daemon.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        while sum(line.startswith(b"MODEL") for line in seen) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130) and b"Traceback" not in err
    assert ANSI.encode() not in b"".join(seen) + rest
    first = b"".join(seen).decode().split("\n\n", 1)[0]
    assert first == format_status(json.loads(daemon.body), url=daemon.url).split("\n\n", 1)[0]

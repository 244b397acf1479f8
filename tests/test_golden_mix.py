"""Golden traffic mix: what users see of a fixed sequence of requests, pinned in
``fixtures/golden/`` so that a change meant to keep behaviour (a refactor of the request path)
can be checked for it: the SSE and JSON bytes clients get, the usage and anomaly lines, and the
``/metrics`` counters.

ccpd runs in this process on loopback (``start_ccpd``, as in ``tests/test_proxy.py``), in
front of two loopback fake upstreams (``anthropic`` and ``zai``, :mod:`ccpd.testing.fakeupstream`),
in ``hybrid`` mode with a 10-token rolling quota for ``glm-solo``. One raw HTTP/1.1 client
sends the requests of :data:`MIX` one after another (each waits for the previous one's usage
line), each on a connection of its own (``Connection: close``), then reads ``/metrics``:

==========================  ====================================================  =======
step                        request                                               status
==========================  ====================================================  =======
messages_json               POST /v1/messages, JSON, usage with cache tokens      200
messages_sse                the same, streamed (SSE)                              200
messages_sse_deltas         streamed, 25 text deltas 1 ms apart                   200
count_tokens                POST /v1/messages/count_tokens                        200
models                      GET /v1/models (passthrough)                          200
malformed_json              a body that is not JSON: ccpd refuses it              400
upstream_400                the lane answers invalid_request_error                400
upstream_500                the lane answers api_error                            500
client_hangs_up             a stream the client leaves after message_start        499*
glm_solo_fills_quota        glm-solo on the zai lane (env key): 17 of 10 tokens   200
glm_solo_overshoot          glm-solo again: hybrid's one overshoot attempt        200
glm_solo_quota_blocked      glm-solo a third time: ccpd's own 429 (no secondary)  429
glm_1308_rerouted           glm-4.6: zai answers Z.AI 1308, rerouted to           200
                            anthropic/claude-sonnet-4-5
upstream_529_overloaded     the lane answers Anthropic's 529 overloaded_error     529
==========================  ====================================================  =======

(* 499 is the status of the usage line; the client saw the 200 head and message_start.)

The golden files:

- ``usage.json``, ``anomaly.json``: the lines of ``logs/usage.jsonl`` and
  ``logs/anomaly.jsonl``, in order and with their keys in ccpd's order, each labelled with the
  step it belongs to. Volatile values are replaced, keeping whether they were null: ``ts``,
  ``cooldown_next_ts`` -> ``"<ts>"``; ``rid`` -> ``"<rid:STEP>"`` (so an anomaly line still
  shows which request it is about); every ``*_ms`` field -> ``"<ms>"``; ``gap_seconds_p50/p95``
  -> ``"<s>"``; in strings, the fakes' and ccpd's loopback URLs/ports -> ``<anthropic-fake>``,
  ``<zai-fake>``, ``<ccpd>``, and the wall-clock seconds of ``lifts in Ns`` and
  ``cooling down for Ns`` -> ``<N>s``. (The 429 of ``glm_solo_quota_blocked`` keeps its
  ``retry-after: 18000`` and ``retry in 18000s``: a request larger than the quota never fits,
  so ccpd says "a whole window", whatever the time.)
- ``client.json``: what each client received: status line, every header in the order sent
  (``Date`` as ``<date>``, ``TwistedWeb/<version>`` in ``Server``; the fakes send no
  per-request ids, the 529's ``request-id`` is a constant of the fake), the framing (``chunked``,
  ``content-length`` or ``close``), whether the body came whole, and the body itself, byte for
  byte after de-chunking, as a list of lines (``"".join`` gives the bytes back). Chunk sizes are
  not pinned: they depend on how TCP reads coalesce, not on ccpd.
- ``metrics.json``: the ``ccp_*`` families of ``/metrics`` (type, help text) and their samples,
  by name and sorted labels. Histograms keep only ``_count``; ``*_created`` samples are
  dropped; samples whose value depends on time or on the disk keep their label set with the
  value ``"<volatile>"`` (:data:`VOLATILE_METRICS`). Every request that reaches a fake asks it
  to wait 3 ms before answering, so that no time to first token rounds down to 0 ms (ccpd only
  observes ``ccp_ttft_seconds`` for a non-zero one): its ``_count`` is deterministic.

On a mismatch the test fails with a unified diff per golden file and leaves the live versions
in ``<tmp_path>/golden-live/`` (the path is in the message).

Regenerate the golden files (only when a change of what users see is intended), from the code
as committed, not from a working tree with edits in progress::

    git worktree add /tmp/golden-base HEAD
    cp tests/test_golden_mix.py /tmp/golden-base/tests/   # while it is not committed yet
    cd /tmp/golden-base && CCPD_REGEN_GOLDEN=1 PYTHONPATH=/tmp/golden-base \\
        /path/to/checkout/.venv/bin/python -m pytest -p no:cacheprovider tests/test_golden_mix.py
    cp /tmp/golden-base/fixtures/golden/* /path/to/checkout/fixtures/golden/
    git worktree remove --force /tmp/golden-base

or, in the checkout itself: ``CCPD_REGEN_GOLDEN=1 .venv/bin/python -m pytest
tests/test_golden_mix.py``. Review the diff of ``fixtures/golden/`` before committing it.

Nothing here depends on timing (the 3 ms above is only a lower bound): every exchange and every
wait is bounded (:data:`EXCHANGE_TIMEOUT_S`); the test takes under two seconds.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.support import MESSAGE, SECRET, until

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "fixtures" / "golden"
REGEN = os.environ.get("CCPD_REGEN_GOLDEN") == "1"
EXCHANGE_TIMEOUT_S = 5.0
FIRST_BYTE = ("x-fake-first-byte-ms", "3")  # see the module docstring (ttft never 0 ms)

GLM = {**MESSAGE, "model": "glm-4.6"}
GLM_SOLO = {**MESSAGE, "model": "glm-solo"}
QUOTAS = {"models": {"glm-solo": {"rolling_limit_tokens": 10}}}
ZAI_LIMIT_FIXTURE = "zai_1308_type_shape"  # fixtures/limits/answers.json


@dataclass(frozen=True)
class Step:
    """One request of the mix."""

    name: str
    status: int                   # the status of its usage line (checked before any golden)
    path: str = "/v1/messages"
    body: object = None           # a dict is sent as JSON, bytes as they are; None: a GET
    headers: tuple = (FIRST_BYTE,)
    hang_up: bool = False         # the client goes away once message_start is in
    zai_limit: str | None = None  # the zai fake answers every Messages request with this


MIX = (
    Step("messages_json", 200, body=MESSAGE, headers=(
        FIRST_BYTE, ("x-fake-input-tokens", "42"), ("x-fake-events", "7"),
        ("x-fake-cache-creation", "25"), ("x-fake-cache-read", "300"))),
    Step("messages_sse", 200, body={**MESSAGE, "stream": True}),
    Step("messages_sse_deltas", 200, body={**MESSAGE, "stream": True}, headers=(
        FIRST_BYTE, ("x-fake-events", "25"), ("x-fake-interval-ms", "1"),
        ("x-fake-input-tokens", "1500"))),
    Step("count_tokens", 200, path="/v1/messages/count_tokens", body=MESSAGE,
         headers=(FIRST_BYTE, ("x-fake-input-tokens", "77"))),
    Step("models", 200, path="/v1/models"),
    Step("malformed_json", 400, body=b'{"model": "claude-sonnet-4-5", "max_tokens": 64,'),
    Step("upstream_400", 400, body=MESSAGE, headers=(
        FIRST_BYTE, ("x-fake-status", "400"), ("x-fake-error-type", "invalid_request_error"))),
    Step("upstream_500", 500, body=MESSAGE, headers=(FIRST_BYTE, ("x-fake-status", "500"))),
    Step("client_hangs_up", 499, body={**MESSAGE, "stream": True},
         headers=(FIRST_BYTE, ("x-fake-scenario", "hang-after-headers")), hang_up=True),
    Step("glm_solo_fills_quota", 200, body=GLM_SOLO),
    Step("glm_solo_overshoot", 200, body=GLM_SOLO),
    Step("glm_solo_quota_blocked", 429, body=GLM_SOLO),
    Step("glm_1308_rerouted", 200, body=GLM, zai_limit=ZAI_LIMIT_FIXTURE),
    Step("upstream_529_overloaded", 529, body=MESSAGE,
         headers=(FIRST_BYTE, ("x-fake-scenario", "overloaded"))),
)

# Families whose sample values depend on time or on the disk: their label sets are pinned,
# their values are not.
VOLATILE_METRICS = frozenset({
    "ccp_wasted_retry_seconds",              # how long the limit answer took, on loopback
    "ccp_lane_probe_seconds",                # how long the lanes' readiness probes took
    "ccp_provider_reset_timestamp_seconds",  # a reset time relative to the wall clock
    "ccp_store_size_bytes",                  # SQLite file and WAL sizes
    "ccp_rollup_duration_seconds",           # how many roller ticks ran so far
})


# -- a raw HTTP/1.1 client: the bytes exactly as they arrive ------------------------------------

class _RawClient(Protocol):
    """Sends ``payload``, keeps every byte that comes back until the connection closes (or,
    with ``hang_up``, closes it itself once message_start is in); bounded by
    :data:`EXCHANGE_TIMEOUT_S`."""

    def __init__(self, payload: bytes, hang_up: bool = False):
        self.payload = payload
        self.hang_up = hang_up
        self.data = bytearray()
        self.hung_up = False
        self.timed_out = False
        self.closed: defer.Deferred = defer.Deferred()
        self._timer = None

    def connectionMade(self):
        self._timer = reactor.callLater(EXCHANGE_TIMEOUT_S, self._expire)
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.data += data
        if self.hang_up and not self.hung_up:
            body = parse_response(bytes(self.data))["body"]
            if b"event: message_start" in body and body.endswith(b"\n\n"):
                self.hung_up = True
                self.transport.loseConnection()

    def _expire(self):
        self.timed_out = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.closed.callback(bytes(self.data))


def request_bytes(port: int, step: Step) -> bytes:
    method = "GET" if step.body is None else "POST"
    lines = [f"{method} {step.path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"x-api-key: {SECRET}"]
    data = b""
    if step.body is not None:
        data = step.body if isinstance(step.body, bytes) else json.dumps(step.body).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in step.headers]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def exchange(port: int, payload: bytes, hang_up: bool = False) -> bytes:
    client = _RawClient(payload, hang_up)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port,
                                             timeout=EXCHANGE_TIMEOUT_S), client)
    data = await client.closed
    assert not client.timed_out, \
        f"no end of the exchange in {EXCHANGE_TIMEOUT_S}s: {payload[:80]!r} got {data[:300]!r}"
    assert hang_up == client.hung_up, f"hang-up expected: {hang_up}, got {data[:300]!r}"
    return data


def parse_response(data: bytes) -> dict:
    """Status line, headers (in order, as sent), framing, body (de-chunked) and whether the
    body came whole, of one HTTP/1.1 response (possibly cut short)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return {"status_line": "", "headers": [], "framing": "", "complete": False,
                "body": b""}
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append([name, value[1:] if value.startswith(" ") else value])
    names = {name.lower(): value for name, value in headers}
    if names.get("transfer-encoding", "").lower() == "chunked":
        framing, pieces, complete, at = "chunked", [], False, 0
        while True:
            size_end = rest.find(b"\r\n", at)
            if size_end < 0:
                break
            size = int(rest[at:size_end].split(b";")[0], 16)
            if size == 0:
                complete = rest[size_end:size_end + 4] == b"\r\n\r\n"
                break
            if size_end + 2 + size + 2 > len(rest):
                pieces.append(rest[size_end + 2:size_end + 2 + size])
                break
            pieces.append(rest[size_end + 2:size_end + 2 + size])
            at = size_end + 2 + size + 2
        body = b"".join(pieces)
    elif "content-length" in names:
        framing = "content-length"
        length = int(names["content-length"])
        body, complete = rest[:length], len(rest) >= length
    else:
        framing, body, complete = "close", rest, True
    return {"status_line": status_line, "headers": headers, "framing": framing,
            "complete": complete, "body": body}


# -- normalisation ------------------------------------------------------------------------------

class Normaliser:
    """Replaces what varies from run to run (see the module docstring), nothing else."""

    # seconds counted from the wall clock: until a limit answer's reset, a cooldown's end
    _SECONDS = re.compile(r"\b(lifts in|cooling down for) \d+(?:\.\d+)?s\b")

    def __init__(self, urls: dict[str, str]):
        self._urls = urls  # "http://127.0.0.1:PORT" -> "<name>"
        self.rids: dict[str, str] = {}  # rid -> "<rid:STEP>"

    def text(self, value: str) -> str:
        for url, name in self._urls.items():
            value = value.replace(url, f"http://{name}").replace(url.split("//", 1)[1], name)
        return self._SECONDS.sub(lambda found: f"{found.group(1)} <N>s", value)

    def line(self, line: dict) -> dict:
        out = {}
        for key, value in line.items():
            if value is None:
                out[key] = None
            elif key in ("ts", "cooldown_next_ts"):
                out[key] = "<ts>"
            elif key == "rid":
                out[key] = self.rids.get(value, "<rid:unknown>")
            elif key.endswith("_ms"):
                out[key] = "<ms>"
            elif key in ("gap_seconds_p50", "gap_seconds_p95"):
                out[key] = "<s>"
            elif isinstance(value, str):
                out[key] = self.text(value)
            else:
                out[key] = value
        return out

    def response(self, step: Step, data: bytes) -> dict:
        answer = parse_response(data)
        headers = []
        for name, value in answer["headers"]:
            if name.lower() == "date":
                value = "<date>"
            elif name.lower() == "server":
                value = re.sub(r"TwistedWeb/\S+", "TwistedWeb/<version>", value)
            headers.append(f"{name}: {self.text(value)}")
        body = answer["body"]
        try:
            shown = {"body": self.text(body.decode("utf-8")).splitlines(keepends=True)}
        except UnicodeDecodeError:
            shown = {"body_hex": body.hex()}
        return {"step": step.name,
                "request": f"{'GET' if step.body is None else 'POST'} {step.path}",
                "request_headers": dict(step.headers),
                "status_line": answer["status_line"], "headers": headers,
                "framing": answer["framing"], "complete": answer["complete"], **shown}


def metrics_view(text: str) -> dict:
    """The deterministic part of the ``ccp_*`` families (see the module docstring)."""
    families, samples = {}, {}
    for family in text_string_to_metric_families(text):
        # (the parser makes a family of each *_created sample: creation times)
        if not family.name.startswith("ccp_") or family.name.endswith("_created"):
            continue
        families[family.name] = {"type": family.type, "help": family.documentation}
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if family.type == "histogram" and not sample.name.endswith("_count"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = (
                "<volatile>" if family.name in VOLATILE_METRICS else sample.value)
    return {"families": dict(sorted(families.items())), "samples": dict(sorted(samples.items()))}


def dump(value) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"


def changed_steps(expected: str, live: str) -> str:
    """Which steps an expected and a live golden list differ in (for the failure message)."""
    try:
        old, new = json.loads(expected), json.loads(live)
    except ValueError:
        return "no readable golden file"
    if not isinstance(old, list):
        return "differs"
    steps = dict.fromkeys(entry["step"] for entry in old + new)
    changed = [step for step in steps
               if [e for e in old if e["step"] == step] != [e for e in new if e["step"] == step]]
    return "steps " + ", ".join(changed) if changed else "same entries, other order or layout"


async def wait_for(predicate, what: str) -> None:
    """:func:`tests.support.until`, bounded by :data:`EXCHANGE_TIMEOUT_S`, saying ``what``."""
    try:
        await until(predicate, timeout=EXCHANGE_TIMEOUT_S)
    except AssertionError:
        raise AssertionError(f"{what} within {EXCHANGE_TIMEOUT_S}s") from None


# -- the test -----------------------------------------------------------------------------------

async def run_mix(tmp_path, start_ccpd, make_fake) -> dict[str, str]:
    """Run :data:`MIX`; the text of each golden file, by name."""
    (tmp_path / "quotas.json").write_text(json.dumps(QUOTAS))
    anthropic, zai = make_fake(), make_fake()
    zai.relative_limit_times = True  # the 1308's reset as far ahead of now as in the fixture
    ccpd = await start_ccpd(anthropic.url(), zai_url=zai.url(),
                            extra="[routing]\nreroute_mode = hybrid\n")
    port = int(ccpd.url.rsplit(":", 1)[1])
    norm = Normaliser({anthropic.url(): "<anthropic-fake>", zai.url(): "<zai-fake>",
                       ccpd.url: "<ccpd>"})

    responses = []
    for index, step in enumerate(MIX):
        zai.limit_answer = step.zai_limit
        data = await exchange(port, request_bytes(port, step), step.hang_up)
        zai.limit_answer = None
        # a request that ended has its line (the client's hang-up is seen a little later)
        await wait_for(lambda: len(ccpd.usage_lines()) > index, f"{step.name}: no usage line")
        await wait_for(lambda: anthropic.in_flight == zai.in_flight == 0,
                       f"{step.name}: a fake upstream still serves a request")
        line = ccpd.usage_lines()[index]
        norm.rids[line["rid"]] = f"<rid:{step.name}>"
        assert line["status"] == step.status, (step.name, line)
        responses.append(norm.response(step, data))

    usage = ccpd.usage_lines()
    assert len(usage) == len(MIX), usage[len(MIX):]
    try:  # the store's writer commits its batch after a short delay
        await wait_for(lambda: ccpd.metric("ccp_store_writes_total") == len(MIX), "")
    except AssertionError:
        pass  # the metrics diff shows it
    scrape = parse_response(await exchange(port, request_bytes(
        port, Step("metrics", 200, path="/metrics", headers=()))))
    assert scrape["status_line"].startswith("HTTP/1.1 200 ") and scrape["complete"]

    steps = {f"<rid:{step.name}>": step.name for step in MIX}
    usage_view = [{"step": step.name, "line": norm.line(line)} for step, line in zip(MIX, usage)]
    anomalies = [norm.line(line) for line in ccpd.anomaly_lines()]
    anomaly_view = [{"step": steps.get(line.get("rid"), "?"), "line": line}
                    for line in anomalies]
    return {"usage.json": dump(usage_view), "anomaly.json": dump(anomaly_view),
            "client.json": dump(responses),
            "metrics.json": dump(metrics_view(scrape["body"].decode("utf-8")))}


@pytest_twisted.ensureDeferred
async def test_golden_mix(tmp_path, start_ccpd, make_fake):
    live = await run_mix(tmp_path, start_ccpd, make_fake)
    if REGEN:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        for name, text in live.items():
            (GOLDEN_DIR / name).write_text(text, encoding="utf-8")
        return
    out = tmp_path / "golden-live"
    out.mkdir()
    diffs = []
    for name, text in live.items():
        (out / name).write_text(text, encoding="utf-8")
        path = GOLDEN_DIR / name
        expected = path.read_text(encoding="utf-8") if path.exists() else ""
        if expected != text:
            what = changed_steps(expected, text) if path.exists() else "no golden file"
            diffs.append(f"{name}: {what}\n" + "\n".join(
                difflib.unified_diff(expected.splitlines(), text.splitlines(),
                                     f"fixtures/golden/{name}", f"live {name}", lineterm="")))
    if diffs:
        pytest.fail(f"what users see of the golden mix changed (live files in {out}; if the "
                    f"change is intended, regenerate: see tests/test_golden_mix.py):\n\n"
                    + "\n\n".join(diffs), pytrace=False)

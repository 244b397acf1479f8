"""A loopback Anthropic-compatible upstream for tests and benchmarks.

It answers ``POST /v1/messages`` (JSON or SSE), ``POST /v1/messages/count_tokens`` and
``GET /v1/models`` under any path prefix (so ``/api/anthropic/v1/messages`` works too, like
Z.AI's endpoint), and Z.AI's quota endpoint ``GET /api/monitor/usage/quota/limit`` at the host
root. What it does is chosen per request by headers:

- ``x-fake-input-tokens`` (12), ``x-fake-cache-creation`` (0), ``x-fake-cache-read`` (0):
  the usage it reports; ``x-fake-events`` (5): text deltas, which is also the output tokens;
- ``x-fake-model``: the model name the answer gives (default: the one asked for);
- ``x-fake-interval-ms`` (0): pause between stream events; ``x-fake-first-byte-ms`` (0): pause
  before the answer;
- ``x-fake-status`` with ``x-fake-error-type``: an Anthropic error answer (429 carries
  ``retry-after: 30`` and ``anthropic-ratelimit-tokens-reset``, 30 s after the fake's clock);
- ``x-fake-scenario``: ``zai-1308`` / ``zai-1310`` (Z.AI limit answers whose message says
  the limit resets 30 minutes after the fake's clock, in +08:00), ``usage-headers``
  (usage only in ``X-*`` headers), ``hang`` (never answers), ``hang-after-headers`` (SSE
  headers and ``message_start``, then nothing), ``die-mid-stream`` (two deltas, then the
  connection is cut), ``echo`` (describes the request it got), ``big`` (a 1 MiB JSON answer).

Fault scenarios (``x-fake-scenario``), for the fault suite; each answers a JSON or a streamed
request alike unless marked (SSE):

- ``stall-before-headers``: the same as ``hang``;
- ``stall-mid-body``: headers, then half of the JSON body (with the full ``content-length``) or
  the first five SSE events, then nothing;
- ``reset-mid-stream``: the same beginning, then a TCP reset (RST) instead of an end;
- ``overloaded``: Anthropic's 529 ``overloaded_error`` answer, headers and body as the API sends
  them; ``overloaded-mid-stream`` (SSE): a 200 stream that breaks off with an ``event: error``
  carrying ``overloaded_error``, as the API does when it is overloaded after the stream began.
  Setting ``fake.overloaded = True`` answers every Messages request with the 529 (a storm);
- ``malformed-sse`` / ``non-utf8-sse`` (SSE): a stream with comments, CRLF and bare CR line
  ends, lines without a colon, events without a name, a broken JSON ``message_delta``, unknown
  events / invalid UTF-8 in text deltas and in ``message_start``, a character cut between two
  writes; the usage in the valid ``message_start`` and last ``message_delta`` is the usual one;
- ``gzip``: the usual answer gzip-compressed with ``content-encoding: gzip`` although ccpd asks
  for ``identity`` (the bytes are deterministic: ``mtime`` 0);
- ``huge-stream`` (SSE): ``x-fake-bytes`` (50 MiB) of text deltas, written by a push producer
  that pauses when the connection's buffer is full, so the fake holds at most one block in
  memory however slowly the client reads; ``streamed_bytes`` counts what it handed over;
- ``endless-line`` (SSE): the usual stream with, after its ``ping``, one ``data:`` line of
  ``x-fake-bytes`` (50 MiB) written the same way: a line no SSE reader should hold whole;
- ``gate``: the usual answer, held back until ``open_gate()``.

Provider limits, with the real providers' header names and body shapes, all taken from
``fixtures/limits/answers.json`` (``tests/test_fakeupstream.py`` holds the fake to it):

- ``x-fake-scenario: limit:<fixture name>`` (``limit:zai_1302_concurrency``,
  ``limit:anthropic_unified_rejected_five_hour``, ...): that fixture's status, headers and
  JSON body, exactly; an unknown name gets a 400 naming it. ``fake.limit_answer = "<name>"``
  (None: off) answers every Messages request so, for reroute tests; it goes before
  ``limit_tokens``, which it leaves alone. The fixtures' times are fixed (their ``now`` is
  ``1796200000``); ``fake.relative_limit_times = True`` moves them (unified resets, per-minute
  reset times, the wall-clock time in a Z.AI message) by the fake's clock minus that ``now``,
  so a limit lifts as far ahead of the fake's now as it did of the fixtures';
- ``x-fake-unified: 5h=0.85,7d=0.30,status=allowed_warning`` (keys ``5h``, ``7d``: 0-1;
  ``status``: allowed, allowed_warning, rejected; ``claim``: the representative claim, default
  the fuller window; ``5h-reset``/``7d-reset``: epoch seconds, default the fake's clock plus one
  hour / five days), or ``fake.unified = {"5h": 0.85, ...}`` (None: off) for every answer of
  the fake: Anthropic's ``anthropic-ratelimit-unified-*`` headers (status, reset,
  representative-claim, 5h-/7d- status, reset and utilization, fallback-percentage,
  overage-status) on the usual JSON or SSE answer. ``status=rejected`` turns the answer into
  the 429 of ``anthropic_unified_rejected_<claim>`` (five_hour's for another claim), its
  unified values and ``retry-after`` from the spec. A bad value gets a 400.

Z.AI's quota endpoint answers ``fixtures/zai/quota_limit.json`` with the 5-hour and weekly
token windows' ``percentage`` (0-100) from ``fake.quota`` (``{"five_hour": 42, "weekly":
10}``; the fixture's figure when absent) and ``nextResetTime`` (ms) from ``five_hour_reset`` /
``weekly_reset`` (epoch seconds; default the fake's clock plus one hour / five days).
``fake.quota_mode`` makes it fail: ``error`` (HTTP 500, JSON), ``not-json`` (200, an HTML
page), ``hang`` (no answer), ``no-limits`` (200, ``data`` empty), ``unauthorized`` (401,
Z.AI's code 1001), ``expired`` (HTTP 200 with ``{"code": 401, ...}``, as Z.AI answers a wrong
or expired key). Quota requests are recorded in ``fake.requests`` like the others.

``drop_connections()`` closes the fake's idle server-side connections (so a test can see the
proxy's pooled sockets go), ``open_connections()`` counts them, ``peak_in_flight`` is the
largest number of requests served at once, and each recorded request's ``outcome`` says how
it ended (``finished``, or ``cancelled`` when the client went away first).

Started with ``limit_tokens=N`` (``--limit-tokens N``) it counts the tokens it served and, once
they reach N, answers every Messages request with a limit (``limit_code``: Z.AI's ``1308`` or
``1310``, or ``429`` for Anthropic's ``rate_limit_error``), like a plan that ran out.

Its answers are deterministic, so a test can compare bytes sent directly with bytes proxied.
Run it alone with ``python -m ccpd.testing.fakeupstream --port 0 --port-file F``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gzip
import json
import re
import sys
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping

from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

from ccpd.lanes import PROBE_USER_AGENT

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    outcome: str = ""  # "finished" or "cancelled" (the client went away) once it is over


def _int_header(request, name: str, default: int) -> int:
    value = request.getHeader(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _headers(request) -> dict[str, str]:
    return {name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()}


def sse(event: str, payload: dict) -> bytes:
    return (f"event: {event}\ndata: " + json.dumps(payload, separators=(",", ":"))
            + "\n\n").encode()


def message_events(model: str, usage: dict, deltas: int) -> list[bytes]:
    """The SSE events of one Anthropic text answer with ``deltas`` text deltas."""
    start_usage = {**usage, "output_tokens": 1}
    events = [
        sse("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"}),
    ]
    events += [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": f"tok{i} "}})
               for i in range(deltas)]
    events += [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta",
                              "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                              "usage": {"output_tokens": deltas}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


def message_json(model: str, usage: dict | None, deltas: int) -> dict:
    answer = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
              "content": [{"type": "text", "text": "".join(f"tok{i} " for i in range(deltas))}],
              "stop_reason": "end_turn", "stop_sequence": None}
    if usage is not None:
        answer["usage"] = {**usage, "output_tokens": deltas}
    return answer


# Anthropic's answer when it is overloaded: status 529, these headers, this body.
OVERLOADED_REQUEST_ID = "req_011CFakeOverloaded0000000"
OVERLOADED_BODY = json.dumps(
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
     "request_id": OVERLOADED_REQUEST_ID}, separators=(",", ":")).encode()
OVERLOADED_HEADERS = {"content-type": "application/json", "x-should-retry": "true",
                      "request-id": OVERLOADED_REQUEST_ID,
                      "cache-control": "no-store, no-cache", "x-robots-tag": "none"}


# -- provider answers taken from the fixtures ----------------------------------------------------

FIXTURES_DIR = Path(__file__).resolve().parents[2] / "fixtures"
LIMIT_FIXTURES = FIXTURES_DIR / "limits" / "answers.json"
QUOTA_FIXTURE = FIXTURES_DIR / "zai" / "quota_limit.json"
QUOTA_PATH = "/api/monitor/usage/quota/limit"
UNIFIED = "anthropic-ratelimit-unified-"
UNIFIED_KEYS = ("5h", "7d", "status", "claim", "5h-reset", "7d-reset")
# unified header infix -> (claim name, seconds from now to its reset unless told)
_UNIFIED_WINDOWS = {"5h": ("five_hour", 3600), "7d": ("seven_day", 5 * 86400)}
# (type, unit) of a Z.AI quota limit -> (fake.quota key, seconds from now to its reset)
_QUOTA_WINDOWS = {("TOKENS_LIMIT", 3): ("five_hour", 3600),
                  ("TOKENS_LIMIT", 6): ("weekly", 5 * 86400)}
QUOTA_MODES = (None, "error", "not-json", "hang", "no-limits", "unauthorized", "expired")
# Z.AI's "no key" answer, and the HTTP 200 it gives a key that is wrong or expired
QUOTA_UNAUTHORIZED = {"code": 1001, "msg": "Authorization Token Missing", "success": False}
QUOTA_EXPIRED = {"code": 401, "msg": "token expired or incorrect", "success": False}
QUOTA_ERROR = {"code": 500, "msg": "System error, please try again later", "success": False}
QUOTA_NOT_JSON = b"<html><head><title>502 Bad Gateway</title></head><body>502</body></html>"
# a wall-clock time as the fixtures write them: Z.AI's messages and per-minute reset headers
_FIXTURE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")


@dataclass(frozen=True)
class Canned:
    """A whole answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


def _json_bytes(payload) -> bytes:
    # as the providers send it: compact, UTF-8 (Z.AI's Chinese messages are not \u-escaped)
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def limit_fixture(name: str) -> dict:
    """The row of fixtures/limits/answers.json called ``name`` (a copy); KeyError if none."""
    for row in _load(LIMIT_FIXTURES)["answers"]:
        if row["name"] == name:
            return copy.deepcopy(row)
    raise KeyError(f"no answer {name!r} in {LIMIT_FIXTURES}")


def _shift_text(text: str, seconds: int) -> str:
    def shifted(found: re.Match) -> str:
        moment = datetime.fromisoformat(found.group(0)) + timedelta(seconds=seconds)
        return moment.strftime(f"%Y-%m-%d{found.group(0)[10]}%H:%M:%S")
    return _FIXTURE_TIME.sub(shifted, text)


def _shift(value, seconds: int):
    if isinstance(value, str):
        return _shift_text(value, seconds)
    if isinstance(value, dict):
        return {key: _shift(item, seconds) for key, item in value.items()}
    if isinstance(value, list):
        return [_shift(item, seconds) for item in value]
    return value


def fixture_answer(name: str, shift_s: int = 0) -> Canned:
    """The answer of fixture ``name``, its times (unified resets in epoch seconds, per-minute
    resets and Z.AI's wall-clock messages) moved ``shift_s`` seconds later; ``retry-after``
    and ``retry-after-ms`` are relative and stay."""
    answer = limit_fixture(name)["answer"]
    headers = {}
    for header, value in answer["headers"].items():
        if shift_s and header.startswith(UNIFIED) and header.endswith("reset"):
            value = str(int(value) + shift_s)
        elif shift_s:
            value = _shift_text(value, shift_s)
        headers[header] = value
    return Canned(answer["status"], headers, _json_bytes(_shift(answer["body"], shift_s)))


def parse_unified(text: str) -> dict[str, str]:
    """``5h=0.85,7d=0.30,status=allowed_warning`` (an ``x-fake-unified`` header) as a dict;
    ValueError for an item it does not know."""
    spec = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in UNIFIED_KEYS:
            raise ValueError(f"{item.strip()!r} is not one of {'=, '.join(UNIFIED_KEYS)}=")
        spec[key] = value.strip()
    return spec


def unified_headers(spec: Mapping[str, object], now: float) -> dict[str, str]:
    """The ``anthropic-ratelimit-unified-*`` headers Anthropic sends a subscription, from a
    spec (keys of :data:`UNIFIED_KEYS`): utilisations 0-1 of ``5h`` and ``7d`` (default 0, or
    1 for a window ``rejected``), overall ``status`` (``allowed``), representative ``claim``
    (the fuller window), resets ``5h-reset``/``7d-reset`` in epoch seconds (``now`` + 1 hour /
    + 5 days). The claimed window's status is the overall one, the other's ``allowed``;
    fallback percentage and overage status are those of the fixture's ordinary answer.
    ValueError for a value that is not a number where one is needed."""
    status = str(spec.get("status") or "allowed")
    claim = str(spec.get("claim") or "")
    used = {short: float(spec[short]) for short in _UNIFIED_WINDOWS if spec.get(short) not in
            (None, "")}
    if not claim:
        claim = "seven_day" if used.get("7d", 0.0) > used.get("5h", 0.0) else "five_hour"
    resets = {short: round(float(spec.get(f"{short}-reset") or now + ahead))
              for short, (_, ahead) in _UNIFIED_WINDOWS.items()}
    ordinary = limit_fixture("anthropic_200_with_utilization")["answer"]["headers"]
    claimed = next((short for short, (name, _) in _UNIFIED_WINDOWS.items() if name == claim),
                   "7d")  # a claim of its own (seven_day_opus): the weekly reset
    headers = {UNIFIED + "status": status, UNIFIED + "reset": str(resets[claimed]),
               UNIFIED + "representative-claim": claim}
    for short, (name, _) in _UNIFIED_WINDOWS.items():
        mine = name == claim
        default = 1.0 if mine and status == "rejected" else 0.0
        headers[f"{UNIFIED}{short}-status"] = status if mine else "allowed"
        headers[f"{UNIFIED}{short}-reset"] = str(resets[short])
        headers[f"{UNIFIED}{short}-utilization"] = repr(used.get(short, default))
    for key in ("fallback-percentage", "overage-status"):
        headers[UNIFIED + key] = ordinary[UNIFIED + key]
    return headers


def unified_rejection(headers: Mapping[str, str], now: float) -> Canned:
    """Anthropic's 429 for a window used up, headers and body as in the fixture
    ``anthropic_unified_rejected_<claim>`` (five_hour's for a claim without one), its unified
    values and ``retry-after`` those of ``headers`` (from :func:`unified_headers`)."""
    claim = headers[UNIFIED + "representative-claim"]
    try:
        template = limit_fixture(f"anthropic_unified_rejected_{claim}")["answer"]
    except KeyError:
        template = limit_fixture("anthropic_unified_rejected_five_hour")["answer"]
    answer = {}
    for name, value in template["headers"].items():
        if name in headers:
            value = headers[name]
        elif name == "retry-after":
            value = str(max(0, round(float(headers[UNIFIED + "reset"]) - now)))
        answer[name] = value
    return Canned(template["status"], answer, _json_bytes(template["body"]))


def quota_answer(quota: Mapping[str, float], now: float) -> dict:
    """Z.AI's quota answer (fixtures/zai/quota_limit.json) with the 5-hour and weekly token
    windows' ``percentage`` from ``quota`` (``five_hour``, ``weekly``: 0-100; the fixture's
    when absent) and ``nextResetTime`` (ms) from ``five_hour_reset``/``weekly_reset`` (epoch
    seconds; default ``now`` + 1 hour / + 5 days)."""
    answer = copy.deepcopy(_load(QUOTA_FIXTURE))
    for limit in answer["data"]["limits"]:
        window = _QUOTA_WINDOWS.get((limit.get("type"), limit.get("unit")))
        if window is None:
            continue
        name, ahead = window
        if name in quota:
            limit["percentage"] = quota[name]
        limit["nextResetTime"] = round(float(quota.get(f"{name}_reset", now + ahead)) * 1000)
    return answer


def malformed_events(model: str, usage: dict, deltas: int) -> list[bytes]:
    """A stream a lenient SSE reader survives: the usage is that of ``message_events``."""
    start, block_start, ping, *text, block_stop, delta, stop = message_events(model, usage, deltas)
    crlf_block_start = block_start.replace(b"\n", b"\r\n")
    return [
        b": keep-alive comment\n\n",
        start,
        crlf_block_start,
        b"event: ping\rdata: {not json at all\r\r",            # bare CR line ends, bad JSON
        b'data: {"type":"ping"}\n\n',                            # an event without a name
        b"this line has no colon\nneither: does-this-matter\n\n",
        b'event: future_event_type\ndata: {"type":"future_event_type","n":1}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta",\ndata: "index":0,'
        b'"delta":{"type":"text_delta","text":"split data lines"}}\n\n',
        *text,
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":\n\n',
        b"event:\n\n",                                          # an empty event name, no data
        block_stop, delta, stop,
    ]


def non_utf8_events(model: str, usage: dict, deltas: int) -> list[bytes]:
    """A stream with bytes that are not UTF-8 (and one character cut between two writes)."""
    start, block_start, ping, *text, block_stop, delta, stop = message_events(model, usage, deltas)

    def text_delta(raw: bytes) -> bytes:
        return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                b'"delta":{"type":"text_delta","text":"' + raw + b'"}}\n\n')

    emoji = text_delta("grin \U0001F600".encode())
    cut = emoji.index(b"\xf0\x9f") + 2
    return [
        start.replace(b'"id":"msg_fake"', b'"id":"msg_\xff\xfe"'),
        block_start, ping,
        text_delta(b"caf\xc3"),                                    # truncated sequence
        text_delta(b"\xff\xfe\x80 latin-1: \xe9t\xe9"),            # not UTF-8 at all
        text_delta(b"overlong \xc0\xaf and surrogate \xed\xa0\x80"),
        emoji[:cut], emoji[cut:],                                 # valid, but cut in two writes
        *text, block_stop, delta, stop,
    ]


_HUGE_TEXT = "x" * 1000
_HUGE_EVENT = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": _HUGE_TEXT}})
HUGE_BLOCK_EVENTS = 60  # one block: 60 text deltas, ~66 KB, written as one piece
HUGE_BLOCK = _HUGE_EVENT * HUGE_BLOCK_EVENTS
_LINE_BLOCK = b"x" * 65536  # a piece of one endless line


@implementer(IPushProducer)
class _HugeStream:
    """Writes ``head``, ``blocks`` times ``block``, then ``tail``, only while the connection
    takes them: the transport pauses it when its buffer is full, so however slowly the client
    reads, the fake holds one block, not the stream."""

    def __init__(self, fake, request, head: bytes, blocks: int, tail: bytes,
                 block: bytes = HUGE_BLOCK):
        self._fake = fake
        self._request = request
        self._head: bytes | None = head
        self._block = block
        self._blocks_left = blocks
        self._tail: bytes | None = tail
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        while not (self._paused or self._stopped):
            if self._head is not None:
                piece, self._head = self._head, None
            elif self._blocks_left:
                self._blocks_left -= 1
                piece = self._block
            elif self._tail is not None:
                piece, self._tail = self._tail, None
            else:
                self._stopped = True
                self._request.unregisterProducer()
                self._request.finish()
                return
            self._fake.streamed_bytes += len(piece)
            self._request.write(piece)  # may call pauseProducing before it returns

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._stopped = True


def _reset(request) -> None:
    """Cut the connection with a TCP reset (RST), not an orderly close (FIN): Twisted's
    ``abortConnection`` closes with ``SO_LINGER`` 0."""
    transport = request.transport
    if transport is not None and getattr(transport, "connected", False):
        transport.abortConnection()


class FakeUpstream(resource.Resource):
    isLeaf = True

    def __init__(self, reactor, record: bool = True, limit_tokens: int | None = None,
                 limit_code: str = "1308"):
        super().__init__()
        self.reactor = reactor
        self.record = record
        self.limit_tokens = limit_tokens
        self.limit_code = limit_code
        self.tokens_served = 0
        self.requests: list[RecordedRequest] = []
        self.probes = 0  # readiness probes (never in requests)
        self.in_flight = 0
        self.peak_in_flight = 0
        self.cancelled = 0
        self.overloaded = False  # True: every Messages request gets Anthropic's 529
        # a fixture name of fixtures/limits/answers.json: every Messages request gets its answer
        self.limit_answer: str | None = None
        # True: fixture answers' times move with the fake's clock (see the module docstring)
        self.relative_limit_times = False
        # unified utilisation headers on every Messages answer ({"5h": 0.85, ...}), or None
        self.unified: Mapping[str, object] | None = None
        self.quota: dict[str, float] = {}  # the quota endpoint's figures: five_hour, weekly, ...
        self.quota_mode: str | None = None  # one of QUOTA_MODES
        self.streamed_bytes = 0  # bytes written by huge-stream answers
        self._gated: list = []
        self._channels = weakref.WeakSet()
        self._port = None

    # -- serving -------------------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1", backlog: int = 1024):
        """Listen on loopback; the backlog is larger than Twisted's 50 so that a proxy opening
        hundreds of connections at once is not refused or left waiting for a SYN retry."""
        site = server.Site(self)
        site.log = lambda request: None
        site.noisy = False
        self._port = self.reactor.listenTCP(port, site, backlog=backlog, interface=interface)
        return self._port

    def url(self) -> str:
        host = self._port.getHost()
        return f"http://{host.host}:{host.port}"

    def open_connections(self) -> int:
        """Server-side connections of this fake that are still open."""
        return sum(1 for channel in list(self._channels) if _connected(channel))

    def drop_connections(self) -> int:
        """Close every open server-side connection (call it when nothing is in flight: the
        proxy's idle pooled connections go away with them); returns how many."""
        dropped = 0
        for channel in list(self._channels):
            if _connected(channel):
                channel.transport.loseConnection()
                dropped += 1
        return dropped

    def open_gate(self) -> int:
        """Answer every request held by the ``gate`` scenario; returns how many."""
        gated, self._gated = self._gated, []
        for answer in gated:
            answer()
        return len(gated)

    # -- requests ------------------------------------------------------------------------------

    def render(self, request):
        path = request.path.decode("latin-1")
        body = request.content.read()
        if request.getHeader(b"user-agent") == PROBE_USER_AGENT:
            # ccpd's readiness probes (a timer's, at start and every probe_interval) are
            # counted apart: the requests a test sends are what it asserts on.
            self.probes += 1
            self._channels.add(request.channel)
            self._answer(request, path, body, [])
            return server.NOT_DONE_YET
        recorded = None
        if self.record:
            recorded = RecordedRequest(
                method=request.method.decode(), path=path,
                query=request.uri.decode("latin-1").partition("?")[2],
                headers=_headers(request),
                body=body)
            self.requests.append(recorded)
        self._channels.add(request.channel)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        finished = request.notifyFinish()
        finished.addCallbacks(self._done, self._gone, callbackArgs=(recorded,),
                              errbackArgs=(recorded,))
        timers: list = []
        finished.addBoth(lambda _: [t.cancel() for t in timers if t.active()])
        delay = _int_header(request, "x-fake-first-byte-ms", 0) / 1000.0
        if delay > 0:
            timers.append(self.reactor.callLater(delay, self._answer, request, path, body, timers))
        else:
            self._answer(request, path, body, timers)
        return server.NOT_DONE_YET

    def _done(self, _, recorded: RecordedRequest | None):
        self.in_flight -= 1
        if recorded is not None:
            recorded.outcome = "finished"

    def _gone(self, _, recorded: RecordedRequest | None):
        self.in_flight -= 1
        self.cancelled += 1
        if recorded is not None:
            recorded.outcome = "cancelled"

    def _answer(self, request, path: str, body: bytes, timers: list,
                 scenario: str | None = None) -> None:
        if request.finished or request._disconnected:
            return None
        if scenario is None:
            scenario = request.getHeader("x-fake-scenario") or ""
        if scenario == "gate":
            self._gated.append(lambda: self._answer(request, path, body, timers, ""))
            return None
        method = request.method
        if scenario == "echo":
            return self._json(request, 200, {
                "method": method.decode(), "path": path,
                "query": request.uri.decode("latin-1").partition("?")[2],
                "headers": _headers(request),
                "body_len": len(body)})
        if scenario in ("hang", "stall-before-headers"):
            return None
        if method == b"GET" and path == QUOTA_PATH:
            return self._quota(request)
        if method == b"GET" and path.endswith("/v1/models"):
            return self._json(request, 200, {"data": [
                {"type": "model", "id": "fake-model", "display_name": "Fake model",
                 "created_at": "2026-01-01T00:00:00Z"}], "has_more": False,
                "first_id": "fake-model", "last_id": "fake-model"})
        if method != b"POST" or not (path.endswith("/v1/messages")
                                     or path.endswith("/v1/messages/count_tokens")):
            return self._error(request, 404, "not_found_error", f"no route for {path}")
        input_tokens = _int_header(request, "x-fake-input-tokens", 12)
        if path.endswith("/count_tokens"):
            return self._json(request, 200, {"input_tokens": input_tokens})
        if scenario.startswith("limit:"):
            return self._fixture(request, scenario[len("limit:"):])
        if self.limit_answer:
            return self._fixture(request, self.limit_answer)
        if self.limit_tokens is not None and self.tokens_served >= self.limit_tokens:
            scenario = "rate-limit" if self.limit_code == "429" else f"zai-{self.limit_code}"
        if scenario in ("zai-1308", "zai-1310"):
            return self._zai_limit(request, scenario)
        if scenario == "overloaded" or self.overloaded:
            return self._overloaded(request)
        asked_unified = request.getHeader("x-fake-unified")
        if asked_unified is not None or self.unified is not None:
            try:
                spec = parse_unified(asked_unified) if asked_unified is not None else self.unified
                headers = unified_headers(spec, self.reactor.seconds())
            except ValueError as e:
                return self._error(request, 400, "invalid_request_error",
                                   f"fake: x-fake-unified or fake.unified: {e}")
            if headers[UNIFIED + "status"] == "rejected":
                return self._send(request, unified_rejection(headers, self.reactor.seconds()))
            for name, value in headers.items():
                request.setHeader(name, value)
        status = 429 if scenario == "rate-limit" else _int_header(request, "x-fake-status", 200)
        if status >= 400:
            error_type = request.getHeader("x-fake-error-type") or _ERROR_TYPES.get(
                status, "api_error")
            if status == 429:
                reset = datetime.fromtimestamp(self.reactor.seconds() + 30, timezone.utc)
                request.setHeader("retry-after", "30")
                request.setHeader("anthropic-ratelimit-tokens-reset",
                                  reset.strftime("%Y-%m-%dT%H:%M:%SZ"))
            return self._error(request, status, error_type, f"fake {error_type}")
        try:
            asked = json.loads(body)
        except ValueError:
            return self._error(request, 400, "invalid_request_error", "body is not JSON")
        asked = asked if isinstance(asked, dict) else {}
        # x-fake-model: answer as another model name (providers answer with dated names)
        model = request.getHeader("x-fake-model") or str(asked.get("model") or "fake-model")
        deltas = _int_header(request, "x-fake-events", 5)
        self.tokens_served += input_tokens + deltas
        usage = {"input_tokens": input_tokens,
                 "cache_creation_input_tokens": _int_header(request, "x-fake-cache-creation", 0),
                 "cache_read_input_tokens": _int_header(request, "x-fake-cache-read", 0)}
        if scenario == "big":
            answer = message_json(model, usage, deltas)
            answer["content"][0]["text"] = "x" * (1 << 20)
            return self._json(request, 200, answer)
        if scenario == "gzip":
            return self._gzip(request, model, usage, deltas, bool(asked.get("stream")))
        if scenario in ("stall-mid-body", "reset-mid-stream") and not asked.get("stream"):
            data = json.dumps(message_json(model, usage, deltas), separators=(",", ":")).encode()
            request.setHeader("content-type", "application/json")
            request.setHeader("content-length", str(len(data)))
            request.write(data[:len(data) // 2])
            if scenario == "reset-mid-stream":
                timers.append(self.reactor.callLater(0.05, _reset, request))
            return None
        if scenario == "usage-headers":
            request.setHeader("x-usage-input-tokens", str(input_tokens))
            request.setHeader("x-usage-output-tokens", str(deltas))
            return self._json(request, 200, message_json(model, None, deltas))
        if not asked.get("stream"):
            return self._json(request, 200, message_json(model, usage, deltas))
        request.setHeader("content-type", "text/event-stream")
        request.setHeader("cache-control", "no-cache")
        events = message_events(model, usage, deltas)
        if scenario == "hang-after-headers":
            request.write(events[0])
            return None
        if scenario == "die-mid-stream":
            for event in events[:3 + 2]:
                request.write(event)
            request.transport.loseConnection()  # cut before the terminating chunk
            return None
        if scenario in ("stall-mid-body", "reset-mid-stream"):
            for event in events[:3 + 2]:
                request.write(event)
            if scenario == "reset-mid-stream":
                # later, so that the events are on the wire before the reset discards the buffer
                timers.append(self.reactor.callLater(0.05, _reset, request))
            return None
        if scenario == "overloaded-mid-stream":
            for event in events[:3]:
                request.write(event)
            request.write(b"event: error\ndata: " + OVERLOADED_BODY + b"\n\n")
            request.finish()
            return None
        if scenario == "malformed-sse":
            events = malformed_events(model, usage, deltas)
        elif scenario == "non-utf8-sse":
            events = non_utf8_events(model, usage, deltas)
        elif scenario == "huge-stream":
            total = _int_header(request, "x-fake-bytes", 50 * 1024 * 1024)
            blocks = max(1, -(-total // len(HUGE_BLOCK)))
            head = b"".join(events[:3])
            tail = b"".join(events[3 + deltas:]).replace(
                b'"output_tokens":%d}' % deltas,
                b'"output_tokens":%d}' % (blocks * HUGE_BLOCK_EVENTS))
            _HugeStream(self, request, head, blocks, tail).start()
            return None
        elif scenario == "endless-line":
            total = _int_header(request, "x-fake-bytes", 50 * 1024 * 1024)
            head = b"".join(events[:3]) + b'event: content_block_delta\ndata: {"x":"'
            tail = b'"}\n\n' + b"".join(events[3:])
            _HugeStream(self, request, head, max(1, -(-total // len(_LINE_BLOCK))), tail,
                        _LINE_BLOCK).start()
            return None
        self._stream(request, iter(events),
                     _int_header(request, "x-fake-interval-ms", 0) / 1000.0, timers)
        return None

    def _stream(self, request, events, interval: float, timers: list) -> None:
        if request.finished or request._disconnected:
            return
        for event in events:
            request.write(event)
            if interval > 0:
                timers.append(self.reactor.callLater(interval, self._stream, request, events,
                                                     interval, timers))
                return
        request.finish()

    def _overloaded(self, request) -> None:
        request.setResponseCode(529)
        for name, value in OVERLOADED_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader("content-length", str(len(OVERLOADED_BODY)))
        request.write(OVERLOADED_BODY)
        request.finish()

    def _gzip(self, request, model: str, usage: dict, deltas: int, stream: bool) -> None:
        request.setHeader("content-encoding", "gzip")
        if not stream:
            data = gzip.compress(json.dumps(message_json(model, usage, deltas),
                                            separators=(",", ":")).encode(), mtime=0)
            request.setHeader("content-type", "application/json")
            request.setHeader("content-length", str(len(data)))
            request.write(data)
            request.finish()
            return
        data = gzip.compress(b"".join(message_events(model, usage, deltas)), mtime=0)
        request.setHeader("content-type", "text/event-stream")
        request.setHeader("cache-control", "no-cache")
        third = max(1, len(data) // 3)
        for start in range(0, len(data), third):
            request.write(data[start:start + third])
        request.finish()

    def _fixture(self, request, name: str) -> None:
        shift = 0
        if self.relative_limit_times:
            shift = round(self.reactor.seconds() - _load(LIMIT_FIXTURES)["now"])
        try:
            answer = fixture_answer(name, shift)
        except KeyError as e:
            return self._error(request, 400, "invalid_request_error", f"fake: {e.args[0]}")
        return self._send(request, answer)

    def _quota(self, request) -> None:
        mode = self.quota_mode
        if mode == "hang":
            return None
        if mode is None:
            return self._json(request, 200, quota_answer(self.quota, self.reactor.seconds()))
        if mode == "not-json":
            return self._send(request, Canned(200, {"content-type": "text/html"},
                                              QUOTA_NOT_JSON))
        answers = {"error": (500, QUOTA_ERROR), "unauthorized": (401, QUOTA_UNAUTHORIZED),
                   "expired": (200, QUOTA_EXPIRED),
                   "no-limits": (200, {"code": 200, "msg": "Operation successful", "data": {},
                                       "success": True})}
        if mode not in answers:
            return self._json(request, 400, {"code": 400, "success": False,
                                             "msg": f"fake: quota_mode {mode!r} is not one of "
                                                    f"{QUOTA_MODES}"})
        return self._json(request, *answers[mode])

    def _send(self, request, answer: Canned) -> None:
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        request.setHeader("content-length", str(len(answer.body)))
        request.write(answer.body)
        request.finish()

    def _zai_limit(self, request, scenario: str) -> None:
        code, what = ("1308", "5 hour") if scenario == "zai-1308" else ("1310", "weekly")
        # dated by the fake's clock (the wall clock on a real reactor), in Z.AI's zone
        reset = datetime.fromtimestamp(self.reactor.seconds() + 30 * 60,
                                       timezone(timedelta(hours=8)))
        self._json(request, 429, {"error": {
            "code": code,
            "message": f"Usage limit reached for {what}. Your limit will reset at "
                       f"{reset.strftime('%Y-%m-%d %H:%M:%S')}"}})

    def _error(self, request, status: int, error_type: str, message: str) -> None:
        self._json(request, status, {"type": "error",
                                     "error": {"type": error_type, "message": message}})

    def _json(self, request, status: int, payload: dict) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        request.setResponseCode(status)
        request.setHeader("content-type", "application/json")
        request.setHeader("content-length", str(len(data)))
        request.write(data)
        request.finish()


def _connected(channel) -> bool:
    transport = getattr(channel, "transport", None)
    return transport is not None and bool(getattr(transport, "connected", False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the port here once listening")
    parser.add_argument("--no-record", action="store_true",
                        help="do not keep requests (for long benchmarks)")
    parser.add_argument("--limit-tokens", type=int,
                        help="answer with a limit once this many tokens were served")
    parser.add_argument("--limit-code", choices=("1308", "1310", "429"), default="1308")
    args = parser.parse_args(argv)
    from twisted.internet import reactor
    fake = FakeUpstream(reactor, record=not args.no_record, limit_tokens=args.limit_tokens,
                        limit_code=args.limit_code)
    port = fake.listen(args.port)
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(str(port.getHost().port))
    else:
        print(fake.url(), flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

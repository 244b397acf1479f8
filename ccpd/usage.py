"""Reading token usage out of what a provider answered, and the usage record ccpd logs.

Anthropic reports usage in the JSON body (``usage``) or, for streams, in
``message_start.message.usage`` (input and cache tokens) and the last ``message_delta.usage``
(cumulative output tokens). Z.AI does the same when it reports usage at all, and may instead send
``X-*`` headers. Usage a provider does not report is zero, never an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from ccpd import jsonparse

_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                 "cache_read_input_tokens")


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def _tokens(value) -> int | None:
    """A token count as providers send it, or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _read_usage(usage, base: TokenUsage = TokenUsage()) -> tuple[TokenUsage, str | None]:
    """``base`` updated with the counts present in a provider's ``usage`` object."""
    if usage is None:
        return base, None
    if not isinstance(usage, dict):
        return base, "usage is not an object"
    counts, problem = {}, None
    for name in _TOKEN_FIELDS:
        if name not in usage or usage[name] is None:
            continue
        value = _tokens(usage[name])
        if value is None:
            problem = f"usage.{name} is not a token count: {usage[name]!r:.40}"
        else:
            counts[name] = value
    if not counts:
        return base, problem
    return TokenUsage(**{name: counts.get(name, getattr(base, name))
                         for name in _TOKEN_FIELDS}), problem


def _error_type(error) -> str | None:
    """Anthropic's ``error.type``, or a Z.AI business ``error.code`` such as ``1308``."""
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    if code not in (None, ""):
        return str(code)
    kind = error.get("type")
    return kind if isinstance(kind, str) and kind else None


def usage_from_json(body: bytes) -> tuple[TokenUsage, str | None, str | None, str | None]:
    """``(usage, served_model, error_type, anomaly)`` of a whole JSON answer."""
    if not body.strip():
        return TokenUsage(), None, None, None
    try:
        answer = jsonparse.loads(body)
    except ValueError as e:
        return TokenUsage(), None, None, f"answer is not JSON: {e}"
    if not isinstance(answer, dict):
        return TokenUsage(), None, None, "answer is not a JSON object"
    usage, anomaly = _read_usage(answer.get("usage"))
    model = answer.get("model")
    return (usage, model if isinstance(model, str) and model else None,
            _error_type(answer.get("error")), anomaly)


# Z.AI and OpenAI-style gateways name their usage headers in several ways; first match wins.
_HEADER_NAMES = {
    "input_tokens": ("x-usage-input-tokens", "x-input-tokens", "x-prompt-tokens"),
    "output_tokens": ("x-usage-output-tokens", "x-output-tokens", "x-completion-tokens"),
    "cache_creation_input_tokens": ("x-usage-cache-creation-input-tokens",
                                    "x-cache-creation-input-tokens"),
    "cache_read_input_tokens": ("x-usage-cache-read-input-tokens", "x-cache-read-input-tokens",
                                "x-cached-tokens"),
}


def usage_from_headers(headers: dict[str, str]) -> TokenUsage:
    """Usage from ``X-*`` response headers (names lower-case); zeros where absent."""
    counts = {}
    if headers:
        for name, candidates in _HEADER_NAMES.items():
            for header in candidates:
                value = _tokens(headers.get(header))
                if value is not None:
                    counts[name] = value
                    break
    return TokenUsage(**counts)


def merge_header_usage(body: TokenUsage, headers: TokenUsage) -> TokenUsage:
    """The body's counts, with header counts filling what the body left at zero."""
    return TokenUsage(**{name: getattr(body, name) or getattr(headers, name)
                         for name in _TOKEN_FIELDS})


# -- server-sent events ------------------------------------------------------------------------

@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None
    truncated: bool = False  # a line of it was longer than MAX_SSE_LINE and was not kept


_EOL = re.compile(rb"\r\n|\r|\n")
MAX_SSE_LINE = 1 << 20  # usage events are a few hundred bytes; text passes through unread


class SSEParser:
    """Incremental parser of a ``text/event-stream`` per the WHATWG rules.

    Bytes may arrive cut anywhere, even between ``\\r`` and ``\\n``; the events are the same.
    An unfinished line is kept as a list of pieces (joined once, when it ends), and a line
    longer than :data:`MAX_SSE_LINE` is dropped as it arrives: memory and CPU stay linear
    whatever an upstream sends. The event it belonged to is marked ``truncated``.
    """

    def __init__(self):
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._overlong = False  # the unfinished line is past MAX_SSE_LINE: dropping it
        self._skip_lf = False
        self._started = False
        self._event = ""
        self._data: list[bytes] = []
        self._id: str | None = None
        self._truncated = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if not self._started:
            chunk = b"".join(self._pending) + chunk
            self._pending, self._pending_size = [], 0
            if len(chunk) < 3 and b"\xef\xbb\xbf".startswith(chunk):
                self._keep(chunk)
                return []
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        if b"\r" in chunk:
            lines = _EOL.split(chunk)
            self._skip_lf = chunk.endswith(b"\r")
        elif b"\n" in chunk:
            lines = chunk.split(b"\n")
        else:
            self._keep(chunk)
            return []
        rest = lines.pop()
        if lines and (self._pending or self._overlong):
            lines[0] = self._take_pending(lines[0])
        events = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._keep(rest)
        return events

    def _keep(self, piece: bytes) -> None:
        """Add ``piece`` to the unfinished line (dropping the line once it is too long)."""
        if self._overlong or not piece:
            return
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size > MAX_SSE_LINE:
            self._pending, self._pending_size, self._overlong = [], 0, True

    def _take_pending(self, end: bytes) -> bytes | None:
        """The unfinished line completed by ``end``; None when it was too long to keep."""
        self._pending.append(end)
        line = None if self._overlong else b"".join(self._pending)
        self._pending, self._pending_size, self._overlong = [], 0, False
        return line

    def _line(self, line: bytes | None) -> SSEEvent | None:
        if line is None or len(line) > MAX_SSE_LINE:
            self._truncated = True
            return None
        if not line:
            return self._dispatch()
        if line[:1] == b":":
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")
        return None

    def _dispatch(self) -> SSEEvent | None:
        event_type, self._event = self._event, ""
        truncated, self._truncated = self._truncated, False
        if not self._data and not truncated:
            return None
        data, self._data = b"\n".join(self._data), []
        return SSEEvent(event_type or "message", data.decode("utf-8", "replace"), self._id,
                        truncated)


_ACCOUNTED_EVENTS = frozenset({"message_start", "message_delta", "error"})


class StreamAccountant:
    """Follows an Anthropic-style SSE stream as it passes, keeping its usage.

    Only the few events that carry usage or errors are decoded as JSON; text deltas are only
    noticed (for time to first token), never decoded.
    """

    def __init__(self):
        self._parser = SSEParser()
        self.usage = TokenUsage()
        self.served_model: str | None = None
        self.error_type: str | None = None
        self.first_delta_seen = False
        self.events = 0
        self.started = False  # a readable message_start went by
        self.anomaly: str | None = None

    def feed(self, chunk: bytes) -> None:
        for event in self._parser.feed(chunk):
            self.events += 1
            kind = event.event
            if kind == "content_block_delta":
                self.first_delta_seen = True
            elif kind in _ACCOUNTED_EVENTS:
                if event.truncated:
                    self.anomaly = f"{kind} event has a line over {MAX_SSE_LINE} bytes: not read"
                else:
                    self._account(kind, event.data)
            elif kind == "message" and '"type"' in event.data:
                self._account(None, event.data)

    def _account(self, kind: str | None, data: str) -> None:
        try:
            payload = jsonparse.loads(data)
        except ValueError as e:
            if kind is not None:
                self.anomaly = f"{kind} event is not JSON: {e}"
            return
        if not isinstance(payload, dict):
            return
        kind = kind or payload.get("type")
        problem = None
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                self.started = True
                model = message.get("model")
                if isinstance(model, str) and model:
                    self.served_model = model
                self.usage, problem = _read_usage(message.get("usage"), self.usage)
        elif kind == "message_delta":
            self.usage, problem = _read_usage(payload.get("usage"), self.usage)
        elif kind == "content_block_delta":
            self.first_delta_seen = True
        elif kind == "error":
            self.error_type = _error_type(payload.get("error")) or "api_error"
        if problem:
            self.anomaly = f"{kind}: {problem}"


# -- the record ---------------------------------------------------------------------------------

@dataclass
class UsageRecord:
    """One line of ``usage.jsonl``; docs/System/contracts/USAGE_EVENT_SCHEMA.md defines each
    field. Fields are only ever added, never renamed."""

    ts: float
    rid: str
    model: str
    served_model: str
    lane: str
    op: str
    stream: bool
    status: int
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    ttft_ms: int = 0
    stream_ms: int = 0
    dirty_ms: int = 0
    err_type: str | None = None
    upstream: str = ""
    reroute_mode: str = "hybrid"
    reroute_decision: str = "preferred"
    decision_reason: str = ""
    reroute_attempt: int = 0
    preferred_attempt: bool = True
    quota_headroom_pct: float | None = None
    headroom_pct_rolling: float | None = None
    headroom_pct_weekly: float | None = None
    quota_warn_threshold: float | None = None
    cooldown_active: bool = False
    cooldown_next_ts: float | None = None
    wasted_retry_ms: int = 0
    warn_pct_auto: float | None = None
    gap_seconds_p50: float | None = None
    gap_seconds_p95: float | None = None
    gap_samples: int = 0
    header_mode: str = ""
    upstream_model: str = ""
    limit_class: str | None = None
    provider_utilization_5h: float | None = None
    provider_utilization_7d: float | None = None

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in _RECORD_FIELDS}


_RECORD_FIELDS = tuple(f.name for f in fields(UsageRecord))

"""A loopback Anthropic-compatible upstream for tests and benchmarks.

It answers ``POST /v1/messages`` (JSON or SSE), ``POST /v1/messages/count_tokens`` and
``GET /v1/models`` under any path prefix (so ``/api/anthropic/v1/messages`` works too, like
Z.AI's endpoint). What it does is chosen per request by headers:

- ``x-fake-input-tokens`` (12), ``x-fake-cache-creation`` (0), ``x-fake-cache-read`` (0):
  the usage it reports; ``x-fake-events`` (5): text deltas, which is also the output tokens;
- ``x-fake-model``: the model name the answer gives (default: the one asked for);
- ``x-fake-interval-ms`` (0): pause between stream events; ``x-fake-first-byte-ms`` (0): pause
  before the answer;
- ``x-fake-status`` with ``x-fake-error-type``: an Anthropic error answer (429 carries
  ``retry-after: 30`` and ``anthropic-ratelimit-tokens-reset``);
- ``x-fake-scenario``: ``zai-1308`` / ``zai-1310`` (Z.AI limit answers), ``usage-headers``
  (usage only in ``X-*`` headers), ``hang`` (never answers), ``hang-after-headers`` (SSE
  headers and ``message_start``, then nothing), ``die-mid-stream`` (two deltas, then the
  connection is cut), ``echo`` (describes the request it got), ``big`` (a 1 MiB JSON answer).

Started with ``limit_tokens=N`` (``--limit-tokens N``) it counts the tokens it served and, once
they reach N, answers every Messages request with a limit (``limit_code``: Z.AI's ``1308`` or
``1310``, or ``429`` for Anthropic's ``rate_limit_error``), like a plan that ran out.

Its answers are deterministic, so a test can compare bytes sent directly with bytes proxied.
Run it alone with ``python -m ccpd.testing.fakeupstream --port 0 --port-file F``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from twisted.web import resource, server

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
        self.in_flight = 0
        self.cancelled = 0
        self._port = None

    # -- serving -------------------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1"):
        site = server.Site(self)
        site.log = lambda request: None
        site.noisy = False
        self._port = self.reactor.listenTCP(port, site, interface=interface)
        return self._port

    def url(self) -> str:
        host = self._port.getHost()
        return f"http://{host.host}:{host.port}"

    # -- requests ------------------------------------------------------------------------------

    def render(self, request):
        path = request.path.decode("latin-1")
        body = request.content.read()
        if self.record:
            self.requests.append(RecordedRequest(
                method=request.method.decode(), path=path,
                query=request.uri.decode("latin-1").partition("?")[2],
                headers=_headers(request),
                body=body))
        self.in_flight += 1
        finished = request.notifyFinish()
        finished.addCallbacks(self._done, self._gone)
        timers: list = []
        finished.addBoth(lambda _: [t.cancel() for t in timers if t.active()])
        delay = _int_header(request, "x-fake-first-byte-ms", 0) / 1000.0
        if delay > 0:
            timers.append(self.reactor.callLater(delay, self._answer, request, path, body, timers))
        else:
            self._answer(request, path, body, timers)
        return server.NOT_DONE_YET

    def _done(self, _):
        self.in_flight -= 1

    def _gone(self, _):
        self.in_flight -= 1
        self.cancelled += 1

    def _answer(self, request, path: str, body: bytes, timers: list) -> None:
        scenario = request.getHeader("x-fake-scenario") or ""
        method = request.method
        if scenario == "echo":
            return self._json(request, 200, {
                "method": method.decode(), "path": path,
                "query": request.uri.decode("latin-1").partition("?")[2],
                "headers": _headers(request),
                "body_len": len(body)})
        if scenario == "hang":
            return None
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
        if self.limit_tokens is not None and self.tokens_served >= self.limit_tokens:
            scenario = "rate-limit" if self.limit_code == "429" else f"zai-{self.limit_code}"
        if scenario in ("zai-1308", "zai-1310"):
            return self._zai_limit(request, scenario)
        status = 429 if scenario == "rate-limit" else _int_header(request, "x-fake-status", 200)
        if status >= 400:
            error_type = request.getHeader("x-fake-error-type") or _ERROR_TYPES.get(
                status, "api_error")
            if status == 429:
                reset = datetime.now(timezone.utc) + timedelta(seconds=30)
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

    def _zai_limit(self, request, scenario: str) -> None:
        code, what = ("1308", "5 hour") if scenario == "zai-1308" else ("1310", "weekly")
        reset = (datetime.now(timezone(timedelta(hours=8))) + timedelta(minutes=30))
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

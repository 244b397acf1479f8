"""The proxy: forwards one client request to its lane and relays the answer chunk by chunk.

Bytes go to the client as the upstream sends them (no buffering); usage is read from the same
bytes on the way through. The usage line is written before the client's response is finished,
and a client that goes away stops the upstream read at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from uuid import uuid4

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ccpd import jsonparse
from ccpd.lanes import Lane, MissingCredential, describe_failure, forwardable
from ccpd.limits import LimitAnswer, classify
from ccpd.policy import BLOCKED, Decision
from ccpd.usage import (StreamAccountant, TokenUsage, UsageRecord, merge_header_usage,
                        usage_from_headers, usage_from_json)
from ccpd.web.errors import error_response, sse_error_event

log = Logger()

# A non-streaming body is kept (besides being relayed) only to read its usage; past this size
# it cannot be a Messages answer worth parsing.
_MAX_ACCOUNTED_BODY = 8 * 1024 * 1024
_CONTENT_LENGTH = frozenset({b"content-length"})
OVERLOAD_RETRY_AFTER = b"1"  # seconds; the anthropic SDKs retry a 529 with a backoff of their own


@dataclass
class Exchange:
    """What happened to one client request, filled in as it goes."""

    rid: str
    started: float
    op: str
    model: str
    stream: bool
    lane: str = ""
    upstream: str = ""
    header_mode: str = ""      # how the lane's credentials were set: passthrough, env, bearer-env
    served_model: str = ""
    status: int = 0
    err_type: str | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    first_byte_at: float | None = None
    first_token_at: float | None = None
    last_byte_at: float | None = None
    finished_at: float | None = None
    anomalies: list[dict] = field(default_factory=list)
    decision: Decision | None = None
    sent_model: str = ""       # the model the serving lane was asked for (after a rewrite)
    wasted_retry_ms: int = 0
    limit_class: str | None = None  # the class of a limit answer from the preferred lane
    policy_fields: dict = field(default_factory=dict)  # quota and decision fields of the line

    def anomaly(self, kind: str, detail: str, **extra) -> None:
        self.anomalies.append({"kind": kind, "detail": detail, **extra})

    @staticmethod
    def span(start: float | None, end: float | None) -> float:
        """Seconds from ``start`` to ``end``; 0 when either is unknown."""
        return 0.0 if start is None or end is None else max(0.0, end - start)

    def record(self, reroute_mode: str) -> UsageRecord:
        def ms(start: float | None, end: float | None) -> int:
            return round(self.span(start, end) * 1000)

        return UsageRecord(
            ts=self.started, rid=self.rid, model=self.model,
            served_model=self.served_model or self.sent_model or self.model, lane=self.lane,
            op=self.op,
            stream=self.stream, status=self.status,
            input_tokens=self.usage.input_tokens, output_tokens=self.usage.output_tokens,
            cache_creation_input_tokens=self.usage.cache_creation_input_tokens,
            cache_read_input_tokens=self.usage.cache_read_input_tokens,
            ttft_ms=ms(self.started, self.first_token_at or self.first_byte_at),
            stream_ms=ms(self.first_byte_at, self.last_byte_at),
            dirty_ms=ms(self.started, self.finished_at),
            err_type=self.err_type, upstream=self.upstream, reroute_mode=reroute_mode,
            wasted_retry_ms=self.wasted_retry_ms, header_mode=self.header_mode,
            upstream_model=self.sent_model, limit_class=self.limit_class,
            **self.policy_fields,
        )


def _is_sse(response) -> bool:
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    return content_type.lower().startswith(b"text/event-stream")


def _with_model(body: bytes, payload: dict | None, model: str) -> bytes:
    """The request body with ``model`` in it: the body untouched when it already names it."""
    if payload is None or payload.get("model") == model:
        return body
    return json.dumps({**payload, "model": model}).encode("utf-8")


class _Relay(Protocol):
    """Receives an upstream body, handing each chunk on as it arrives.

    ``done`` fires when the body ends. Cancelling it (Klein does, when the client goes away)
    stops the upstream read; so does ``idle_timeout`` seconds without a byte.
    """

    def __init__(self, on_chunk, clock, idle_timeout: float):
        self._on_chunk = on_chunk
        self._idle_timeout = idle_timeout
        self.timed_out = False
        self.done: defer.Deferred = defer.Deferred(self._cancel)
        self._idle = clock.callLater(idle_timeout, self._on_idle)

    def dataReceived(self, data: bytes) -> None:
        self._idle.reset(self._idle_timeout)
        self._on_chunk(data)

    def connectionLost(self, reason) -> None:
        if self._idle.active():
            self._idle.cancel()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _on_idle(self) -> None:
        self.timed_out = True
        self.transport.stopProducing()

    def _cancel(self, _deferred) -> None:
        if self._idle.active():
            self._idle.cancel()
        self.transport.stopProducing()


@dataclass
class _HeldLimitAnswer:
    """A limit answer from the preferred lane, held back (nothing reached the client yet) so
    that the request can still be rerouted."""

    response: object
    body: bytes
    answer: LimitAnswer


class Proxy:
    """Sends requests to lanes and relays their answers; records every exchange."""

    def __init__(self, config, lanes, recorder, governor, clock, refused_counter):
        self.config = config
        self._overloaded = refused_counter.labels("overloaded")
        self.lanes = lanes
        self.recorder = recorder
        self.governor = governor
        self.clock = clock
        self.active: dict[str, object] = {}  # rid -> request, while it is being served
        self._drained: list[defer.Deferred] = []

    async def handle(self, request, op: str) -> bytes | None:
        """Serve one proxied request. ``op``: messages, count_tokens or passthrough.

        Every request ends as one usage line, ccpd's own 400 and 413 answers included.
        """
        exchange = Exchange(rid=uuid4().hex, started=self.clock.seconds(), op=op, model="",
                            stream=False)
        self.active[exchange.rid] = request
        try:
            return await self._serve(request, op, exchange)
        except defer.CancelledError:
            exchange.status, exchange.err_type = 499, "client_disconnected"
            raise
        finally:
            exchange.finished_at = self.clock.seconds()
            if op == "messages" and exchange.status != 0:
                try:
                    self._account(exchange)
                    exchange.policy_fields = self.governor.usage_fields(
                        exchange.model, exchange.lane, exchange.decision)
                except Exception:  # noqa: BLE001 - the usage line must be written regardless
                    log.failure("quota accounting failed for {rid}", rid=exchange.rid)
            self.recorder.record(exchange)
            del self.active[exchange.rid]
            if not self.active:
                waiters, self._drained = self._drained, []
                for waiter in waiters:
                    waiter.callback(None)

    async def _serve(self, request, op: str, exchange: Exchange) -> bytes | None:
        if len(self.active) > self.config.server.max_in_flight:  # this request is in active
            self._overloaded.inc()
            request.responseHeaders.setRawHeaders(b"retry-after", [OVERLOAD_RETRY_AFTER])
            return self._refused(request, exchange, 529, "overloaded_error",
                                 f"ccpd is serving {self.config.server.max_in_flight} requests "
                                 f"already ([server] max_in_flight); retry shortly")
        if getattr(request, "body_too_large", False):
            return self._refused(request, exchange, 413, "request_too_large",
                                 f"request body exceeds {self.config.server.max_body_bytes} bytes")
        body = request.content.read()
        payload = None
        if op != "passthrough":
            try:
                payload = jsonparse.loads(body)
                if not isinstance(payload, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as e:
                return self._refused(request, exchange, 400, "invalid_request_error",
                                     f"request body is not valid JSON: {e}")
            model = payload.get("model")
            exchange.model = exchange.sent_model = model if isinstance(model, str) else ""
            exchange.stream = op == "messages" and payload.get("stream") is True
            route = self.config.route_for(exchange.model)
        else:
            route = self.config.route_for(None)
        if op == "messages":
            decision = exchange.decision = self.governor.decide(route)
            if decision.decision == BLOCKED:
                return self._blocked(request, route, decision, exchange)
            return await self._messages(request, route, decision, body, payload, exchange)
        return await self.forward(request, self.lanes[route.lane], body, exchange)

    def _refused(self, request, exchange: Exchange, status: int, error_type: str,
                 message: str) -> bytes:
        """ccpd refuses the request itself (a client error): no lane, no anomaly."""
        exchange.status, exchange.err_type = status, error_type
        return error_response(request, status, error_type, message)

    def drain(self, grace: float) -> defer.Deferred:
        """Fires once no request is being served. Requests still running after ``grace``
        seconds are cut off (their usage lines are written with status 499)."""
        if not self.active:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._drained.append(waiter)

        def cut_off():
            for request in list(self.active.values()):
                if request.transport is not None:
                    request.transport.abortConnection()

        timer = self.clock.callLater(grace, cut_off)
        waiter.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return waiter

    async def _messages(self, request, route, decision, body, payload, exchange) -> bytes | None:
        """A Messages request under the reroute policy: one attempt, and one reroute when the
        preferred lane answers with a limit before anything reached the client."""
        exchange.sent_model = decision.model
        attempt_started = self.clock.seconds()
        lane = self.lanes[decision.lane]
        result = await self.forward(request, lane, _with_model(body, payload, decision.model),
                                    exchange, hold_limit=decision.lane == route.lane)
        if not isinstance(result, _HeldLimitAnswer):
            return result
        wasted = self.clock.seconds() - attempt_started
        answer = result.answer
        exchange.limit_class = answer.label
        reroute = self.governor.after_limit(route, lane.name, answer, wasted)
        if reroute is None:
            return self._send_held(request, result, exchange)
        exchange.anomaly("upstream_limit", f"lane {lane.name!r} answered with a limit "
                         f"({answer.label}, {answer.code or result.response.code}); rerouted to "
                         f"{reroute.lane}/{reroute.model}", status=result.response.code,
                         lane=lane.name, limit_class=answer.label)
        exchange.decision = reroute
        exchange.wasted_retry_ms = round(wasted * 1000)
        exchange.sent_model = reroute.model
        return await self.forward(request, self.lanes[reroute.lane],
                                  _with_model(body, payload, reroute.model), exchange)

    def _blocked(self, request, route, decision, exchange: Exchange) -> bytes:
        retry_after = self.governor.retry_after(route)
        exchange.decision = decision
        exchange.lane, exchange.upstream = route.lane, self.lanes[route.lane].upstream
        exchange.status, exchange.err_type = 429, "rate_limit_error"
        exchange.anomaly("quota_blocked", decision.reason, status=429)
        request.responseHeaders.setRawHeaders(b"retry-after", [str(retry_after).encode()])
        return error_response(request, 429, "rate_limit_error",
                              f"ccpd: the token quota of {route.model} is used up on every lane "
                              f"of its route ({decision.reason}); retry in {retry_after}s")

    def _account(self, exchange: Exchange) -> None:
        usage = exchange.usage
        if not (usage.input_tokens or usage.output_tokens or usage.cache_creation_input_tokens
                or usage.cache_read_input_tokens):
            return

        span = exchange.span
        self.governor.account(
            exchange.sent_model, exchange.lane, usage,
            seconds=span(exchange.started, exchange.finished_at),
            stream_seconds=span(exchange.first_byte_at, exchange.last_byte_at),
            ttft_seconds=(span(exchange.started, exchange.first_token_at)
                          if exchange.first_token_at else None))

    async def forward(self, request, lane: Lane, body: bytes, exchange: Exchange,
                      hold_limit: bool = False):
        """Send the request to ``lane`` and relay its answer; a return value is ccpd's own
        answer, or with ``hold_limit`` a :class:`_HeldLimitAnswer` that was not relayed."""
        exchange.lane, exchange.upstream = lane.name, lane.upstream
        exchange.header_mode = lane.config.auth.kind
        try:
            headers = lane.upstream_headers(request.requestHeaders)
        except MissingCredential as e:
            return self._failed(request, exchange, 502, "api_error", str(e))

        sent = lane.request(
            request.method, request.uri, headers,
            body if body or request.method not in (b"GET", b"HEAD") else None)
        idle = lane.config.idle_timeout_s
        timed_out = []
        timer = self.clock.callLater(idle, lambda: (timed_out.append(True), sent.cancel()))
        try:
            response = await sent
        except Exception as e:  # noqa: BLE001 - every failure to get an answer is ours to report
            if timed_out:
                return self._failed(request, exchange, 504, "timeout_error",
                                    f"lane {lane.name!r} sent no answer within {idle:g}s")
            if isinstance(e, defer.CancelledError) or request.channel is None:
                raise defer.CancelledError() from e  # the client went away
            return self._failed(request, exchange, 502, "api_error",
                                f"lane {lane.name!r} could not be reached: {describe_failure(e)}")
        finally:
            if timer.active():
                timer.cancel()
        self.governor.watch.observe_answer(lane.name, response.code, response.headers)
        if hold_limit and response.code >= 400 and not _is_sse(response):
            return await self._hold(request, lane, response, exchange)
        return await self._relay(request, lane, response, exchange)

    async def _hold(self, request, lane: Lane, response, exchange: Exchange):
        """Read a whole error answer before relaying it: a limit answer is held back."""
        chunks: list[bytes] = []
        relay = _Relay(chunks.append, self.clock, lane.config.idle_timeout_s)
        response.deliverBody(relay)
        try:
            await relay.done
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - same as a failure before the answer
            return self._failed(request, exchange, 502, "api_error",
                                f"lane {lane.name!r} broke off its answer: {describe_failure(e)}")
        body = b"".join(chunks)
        headers = {name.decode("latin-1").lower(): values[-1].decode("latin-1")
                   for name, values in response.headers.getAllRawHeaders()}
        answer = classify(response.code, headers, body, self.clock.seconds(),
                          lane.config.reset_tzinfo, lane.config.auth.kind != "passthrough")
        held = _HeldLimitAnswer(response, body, answer)
        if answer.kind is not None:
            return held
        return self._send_held(request, held, exchange)

    def _send_held(self, request, held: _HeldLimitAnswer, exchange: Exchange) -> bytes:
        response = held.response
        exchange.status = response.code
        exchange.first_byte_at = exchange.last_byte_at = self.clock.seconds()
        request.setResponseCode(response.code)
        for name, values in forwardable(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        self._account_body(response, exchange, None, [held.body])
        return held.body

    async def _relay(self, request, lane: Lane, response, exchange: Exchange) -> bytes | None:
        exchange.status = response.code
        is_sse = _is_sse(response)
        request.setResponseCode(response.code)
        for name, values in forwardable(response.headers, _CONTENT_LENGTH if is_sse else frozenset()):
            request.responseHeaders.setRawHeaders(name, values)

        accountant = StreamAccountant() if is_sse else None
        kept: list[bytes] | None = [] if not is_sse and exchange.op != "passthrough" else None
        kept_size = 0
        clock = self.clock

        def on_chunk(data: bytes) -> None:
            nonlocal kept_size
            now = clock.seconds()
            if exchange.first_byte_at is None:
                exchange.first_byte_at = now
            exchange.last_byte_at = now
            request.write(data)
            if accountant is not None:
                accountant.feed(data)
                if exchange.first_token_at is None and accountant.first_delta_seen:
                    exchange.first_token_at = now
            elif kept is not None and kept_size < _MAX_ACCOUNTED_BODY:
                kept.append(data)
                kept_size += len(data)

        relay = _Relay(on_chunk, clock, lane.config.idle_timeout_s)
        response.deliverBody(relay)
        producing = not relay.done.called
        if producing:
            # Backpressure: a slow client pauses the upstream read instead of filling memory.
            request.registerProducer(relay.transport, True)
        broken = False
        try:
            await relay.done
        except defer.CancelledError:
            # the client went away: the provider still charges what it reported so far
            self._account_body(response, exchange, accountant, kept)
            raise
        except Exception as e:  # noqa: BLE001 - the upstream went away or fell silent mid-body
            error_type, message = (
                ("timeout_error", f"lane {lane.name!r} sent nothing for "
                                  f"{lane.config.idle_timeout_s:g}s")
                if relay.timed_out else
                ("api_error", f"lane {lane.name!r} broke off the response: "
                              f"{describe_failure(e)}"))
            broken = True
            exchange.err_type = error_type
            exchange.anomaly("upstream_broken", message, status=response.code)
            if not request.startedWriting:
                request.responseHeaders = type(request.responseHeaders)()
                return error_response(request, 504 if relay.timed_out else 502,
                                      error_type, message)
            if is_sse:
                request.write(sse_error_event(error_type, message))
            elif request.transport is not None:
                # A truncated plain body cannot be marked as failed; closing the connection
                # makes the client see the short read instead of a silently cut answer.
                request.transport.abortConnection()
        finally:
            if producing and request.channel is not None:
                request.unregisterProducer()

        self._account_body(response, exchange, accountant, kept, ended=not broken)
        return None

    def _account_body(self, response, exchange, accountant, kept, ended=False) -> None:
        """Usage, served model and error of the relayed body; ``ended``: it came whole."""
        header_usage = usage_from_headers(
            {name.decode("latin-1").lower(): values[-1].decode("latin-1")
             for name, values in response.headers.getAllRawHeaders()
             if name.lower().startswith(b"x-")})
        if accountant is not None:
            usage, served, error_type, anomaly = (accountant.usage, accountant.served_model,
                                                  accountant.error_type, accountant.anomaly)
            if (ended and not anomaly and not accountant.started and not error_type
                    and exchange.op == "messages"):
                anomaly = (f"no readable message_start in the stream ({accountant.events} "
                           f"events): its usage is unknown")
        elif kept is not None:
            usage, served, error_type, anomaly = usage_from_json(b"".join(kept))
        else:
            return
        exchange.usage = merge_header_usage(usage, header_usage)
        if served:
            exchange.served_model = served
        if error_type and not exchange.err_type:
            exchange.err_type = error_type
        if anomaly and exchange.status < 400:
            exchange.anomaly("usage_unparseable", anomaly)
        if exchange.status >= 400:
            exchange.anomaly("upstream_error", error_type or f"HTTP {exchange.status}",
                             status=exchange.status)

    def _failed(self, request, exchange: Exchange, status: int, error_type: str,
                message: str) -> bytes:
        exchange.status, exchange.err_type = status, error_type
        exchange.anomaly(error_type, message, status=status)
        return error_response(request, status, error_type, message)

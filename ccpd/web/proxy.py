"""The proxy: forwards one client request to its lane and relays the answer chunk by chunk.

One request flows through four steps, each a method with one return type:

1. **decide** (:meth:`Proxy._route`, then the governor): which lane and model serve it;
2. **send** (:meth:`Proxy._send`): the request goes to the lane; the answer's headers are in;
3. **hold** a limit answer (:meth:`Proxy._hold`) that may still be rerouted, or **relay** the
   answer (:meth:`Proxy._relay`): bytes go to the client as the upstream sends them (no
   buffering), and usage is read from the same bytes on the way through;
4. **account** (:meth:`Proxy.handle`'s end): the quota windows, then the usage line.

ccpd's own refusals and failures are raised as :class:`~ccpd.web.errors.ApiError` and turned
into an answer in one place, :meth:`Proxy.handle`. The usage line is written before the
client's response is finished, and a client that goes away stops the upstream read at once.
"""
from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from ccpd import jsonparse
from ccpd.config import Route
from ccpd.lanes import Lane, MissingCredential, describe_failure, forwardable, last_values
from ccpd.limits import LimitAnswer, classify
from ccpd.policy import BLOCKED, Decision
from ccpd.usage import StreamAccountant, merge_header_usage, usage_from_headers, usage_from_json
from ccpd.web.errors import ApiError, api_error_response, sse_error_event
from ccpd.web.exchange import Exchange

log = Logger()

# A non-streaming body is kept (besides being relayed) only to read its usage; past this size
# it cannot be a Messages answer worth parsing.
_MAX_ACCOUNTED_BODY = 8 * 1024 * 1024
_CONTENT_LENGTH = frozenset({b"content-length"})
_SMALL_ANSWER = 64 * 1024  # bytes
OVERLOAD_RETRY_AFTER = b"1"  # seconds; the anthropic SDKs retry a 529 with a backoff of their own


def _is_sse(response) -> bool:
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    return content_type.lower().startswith(b"text/event-stream")


def _with_model(body: bytes, payload: dict | None, model: str) -> bytes:
    """The request body with ``model`` in it: the body untouched when it already names it."""
    if payload is None or payload.get("model") == model:
        return body
    return json.dumps({**payload, "model": model}).encode("utf-8")


def _timed_out(_result, timeout: float):
    """What a request cancelled by its timeout fails with, whatever its canceller said (the
    HTTP client's is a ``ResponseNeverReceived``, not a ``CancelledError``)."""
    raise defer.TimeoutError(f"no answer within {timeout:g}s")


class _Relay(Protocol):
    """Receives an upstream body, handing each chunk on as it arrives.

    ``done`` fires when the body ends. Cancelling it (when the client goes away) stops the
    upstream read; so does ``idle_timeout`` seconds without a byte (an idle timeout, so it is
    pushed back by every chunk rather than being one deadline for the whole body).
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
        exchange = Exchange(rid=os.urandom(16).hex(), started=self.clock.seconds(), op=op)
        self.active[exchange.rid] = request
        try:
            return await self._serve(request, exchange)
        except ApiError as error:
            exchange.fail(error)
            return api_error_response(request, error)
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

    # -- decide ----------------------------------------------------------------------------------

    async def _serve(self, request, exchange: Exchange) -> bytes | None:
        body, payload, route = self._route(request, exchange)
        if exchange.op != "messages":
            lane = self.lanes[route.lane]
            return await self._relay(request, lane, await self._send(request, lane, body,
                                                                      exchange), exchange)
        if self.governor.team is not None:  # team mode: the team's usage as of now first
            await self.governor.team.sync()
        decision = exchange.decision = self.governor.decide(route)
        if decision.decision == BLOCKED:
            raise self._blocked(route, decision, exchange)
        return await self._messages(request, route, decision, body, payload, exchange)

    def _route(self, request, exchange: Exchange) -> tuple[bytes, dict | None, Route]:
        """The request's body, its JSON (None for a passthrough) and its route; refusals of
        ccpd's own (too many in flight, body too large, not JSON) are raised."""
        server = self.config.server
        if len(self.active) > server.max_in_flight:  # this request is in active
            self._overloaded.inc()
            raise ApiError(529, "overloaded_error",
                           f"ccpd is serving {server.max_in_flight} requests already "
                           f"([server] max_in_flight); retry shortly",
                           headers=((b"retry-after", OVERLOAD_RETRY_AFTER),))
        if getattr(request, "body_too_large", False):
            raise ApiError(413, "request_too_large",
                           f"request body exceeds {server.max_body_bytes} bytes")
        body = request.content.read()
        if exchange.op == "passthrough":
            return body, None, self.config.route_for(None)
        try:
            payload = jsonparse.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            raise ApiError(400, "invalid_request_error",
                           f"request body is not valid JSON: {e}") from None
        model = payload.get("model")
        exchange.model = exchange.sent_model = model if isinstance(model, str) else ""
        exchange.stream = exchange.op == "messages" and payload.get("stream") is True
        return body, payload, self.config.route_for(exchange.model)

    def _blocked(self, route: Route, decision: Decision, exchange: Exchange) -> ApiError:
        """The quota blocks every lane of ``route``: ccpd's own 429."""
        retry_after = self.governor.retry_after(route)
        exchange.lane, exchange.upstream = route.lane, self.lanes[route.lane].upstream
        return ApiError(429, "rate_limit_error",
                        f"ccpd: the token quota of {route.model} is used up on every lane "
                        f"of its route ({decision.reason}); retry in {retry_after}s",
                        headers=((b"retry-after", str(retry_after).encode()),),
                        anomaly="quota_blocked", detail=decision.reason)

    async def _messages(self, request, route: Route, decision: Decision, body: bytes,
                        payload: dict, exchange: Exchange) -> bytes | None:
        """A Messages request under the reroute policy: one attempt, and one reroute when the
        preferred lane answers with a limit before anything reached the client."""
        exchange.sent_model = decision.model
        attempt_started = self.clock.seconds()
        lane = self.lanes[decision.lane]
        response = await self._send(request, lane, _with_model(body, payload, decision.model),
                                    exchange)
        if decision.lane != route.lane or response.code < 400 or _is_sse(response):
            return await self._relay(request, lane, response, exchange)
        held = await self._hold(lane, response)
        answer = classify(response.code, last_values(response.headers), held, self.clock.seconds(),
                          lane.config.reset_tzinfo, lane.config.auth.kind != "passthrough")
        if answer.kind is None:
            return self._relay_held(request, response, held, exchange)
        wasted = self.clock.seconds() - attempt_started
        exchange.limit_class = answer.label
        reroute = self.governor.after_limit(route, lane.name, answer, wasted)
        if reroute is None:
            return self._relay_held(request, response, held, exchange)
        self._rerouted(exchange, lane, response.code, answer, reroute, wasted)
        lane = self.lanes[reroute.lane]
        response = await self._send(request, lane, _with_model(body, payload, reroute.model),
                                    exchange)
        return await self._relay(request, lane, response, exchange)

    @staticmethod
    def _rerouted(exchange: Exchange, lane: Lane, status: int, answer: LimitAnswer,
                  reroute: Decision, wasted: float) -> None:
        exchange.anomaly("upstream_limit", f"lane {lane.name!r} answered with a limit "
                         f"({answer.label}, {answer.code or status}); rerouted to "
                         f"{reroute.lane}/{reroute.model}", status=status,
                         lane=lane.name, limit_class=answer.label)
        exchange.decision = reroute
        exchange.wasted_retry_ms = round(wasted * 1000)
        exchange.sent_model = reroute.model

    # -- send ------------------------------------------------------------------------------------

    async def _send(self, request, lane: Lane, body: bytes, exchange: Exchange):
        """Send the request to ``lane``; the answer (an ``IResponse``) once its headers are
        in. ``ApiError`` when the lane has no credentials, cannot be reached or sends no
        answer within its ``idle_timeout_s``; ``CancelledError`` when the client went away."""
        exchange.lane, exchange.upstream = lane.name, lane.upstream
        exchange.header_mode = lane.config.auth.kind
        try:
            headers = lane.upstream_headers(request.requestHeaders)
        except MissingCredential as e:
            raise ApiError(502, "api_error", str(e), anomaly="api_error") from None
        idle = lane.config.idle_timeout_s
        sent = lane.request(request.method, request.uri, headers,
                            body if body or request.method not in (b"GET", b"HEAD") else None)
        try:
            response = await sent.addTimeout(idle, self.clock, onTimeoutCancel=_timed_out)
        except defer.TimeoutError:
            raise ApiError(504, "timeout_error", f"lane {lane.name!r} sent no answer within "
                                                 f"{idle:g}s", anomaly="timeout_error") from None
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure to get an answer is ours to report
            if request.channel is None:
                raise defer.CancelledError() from e  # the client went away
            raise ApiError(502, "api_error", f"lane {lane.name!r} could not be reached: "
                                             f"{describe_failure(e)}", anomaly="api_error") from None
        self.governor.watch.observe_answer(lane.name, response.code, response.headers)
        return response

    # -- hold or relay ---------------------------------------------------------------------------

    async def _hold(self, lane: Lane, response) -> bytes:
        """The whole (error) answer, read before anything of it reaches the client: a limit
        answer may still be rerouted."""
        chunks: list[bytes] = []
        relay = _Relay(chunks.append, self.clock, lane.config.idle_timeout_s)
        response.deliverBody(relay)
        try:
            await relay.done
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - same as a failure before the answer
            raise ApiError(502, "api_error", f"lane {lane.name!r} broke off its answer: "
                                             f"{describe_failure(e)}", anomaly="api_error") from None
        return b"".join(chunks)

    def _relay_held(self, request, response, body: bytes, exchange: Exchange) -> bytes:
        """A held answer goes to the client as the lane sent it."""
        exchange.status = response.code
        exchange.first_byte_at = exchange.last_byte_at = self.clock.seconds()
        request.setResponseCode(response.code)
        for name, values in forwardable(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        self._account_body(response, exchange, None, [body])
        return body

    async def _relay(self, request, lane: Lane, response, exchange: Exchange) -> None:
        """The answer goes to the client chunk by chunk, as the lane sends it."""
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
        # Backpressure: a slow client pauses the upstream read instead of filling memory. An
        # answer of known small length cannot fill memory: it is relayed without (registering
        # and unregistering a producer is a measurable share of a small answer's cost).
        producing = not relay.done.called and not (
            response.length is not UNKNOWN_LENGTH and response.length <= _SMALL_ANSWER)
        if producing:
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
            if not request.startedWriting:  # nothing reached the client: ccpd's own answer
                request.responseHeaders = type(request.responseHeaders)()
                raise ApiError(504 if relay.timed_out else 502, error_type, message,
                               anomaly="upstream_broken") from None
            broken = True
            exchange.err_type = error_type
            exchange.anomaly("upstream_broken", message, status=response.code)
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

    # -- account ---------------------------------------------------------------------------------

    def _account_body(self, response, exchange, accountant, kept, ended=False) -> None:
        """Usage, served model and error of the relayed body; ``ended``: it came whole."""
        header_usage = usage_from_headers(last_values(response.headers, b"x-"))
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

    def _account(self, exchange: Exchange) -> None:
        """The exchange's tokens, counted against its model and lane."""
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

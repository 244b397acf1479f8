"""The Klein application: proxy routes and ops endpoints.

State lives on the :class:`CcpdApp` instance (Klein's "non-global state" pattern), so tests
build one over fakes and drive it with ``StubTreq`` or a real listening port.
"""
from __future__ import annotations

import hmac
import json

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from ccpd import jsonparse
from ccpd.config import database_error
from ccpd.quotas import QuotaError
from ccpd.store import queries
from ccpd.usage import TokenUsage
from ccpd.web import dashboard
from ccpd.web import views
from ccpd.web.errors import error_response
from ccpd.web.guard import Guard
from ccpd.web.proxy import Proxy

log = Logger()
_JSON = [b"application/json"]


def _json(request, body: dict) -> bytes:
    request.responseHeaders.setRawHeaders(b"content-type", _JSON)
    return json.dumps(body).encode("utf-8")


def _query_text(request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[-1].decode("utf-8", "replace") if values else None


def _query_number(request, name: str, default: float, *, integer: bool = False,
                  low: float = 0.0, high: float = float("inf")) -> float:
    """A numeric query parameter; ValueError names it when it is not a number in range."""
    text = _query_text(request, name)
    if text is None or text == "":
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, not {text!r}") from None
    if not low <= value <= high or value != value:
        bound = f"from {low:g} to {high:g}" if high != float("inf") else f">= {low:g}"
        raise ValueError(f"{name} must be {bound}, not {text!r}")
    return value


_SIM_TOKENS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
               "cache_read_input_tokens")


def _sim_request(body: bytes) -> dict:
    """The checked body of ``POST /v1/usage/sim``; ValueError says what is wrong."""
    try:
        sim = jsonparse.loads(body)
    except ValueError as e:
        raise ValueError(f"body is not valid JSON: {e}") from None
    if not isinstance(sim, dict) or not isinstance(sim.get("model"), str) or not sim["model"]:
        raise ValueError('body must be an object with a "model" string')
    unknown = set(sim) - {"model", "seconds", *_SIM_TOKENS}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
    tokens = {}
    for name in _SIM_TOKENS:
        value = sim.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0")
        tokens[name] = value
    seconds = sim.get("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not \
            0 <= seconds < 1e7:
        raise ValueError("seconds must be a number >= 0")
    return {"model": sim["model"], "tokens": tokens, "seconds": float(seconds)}


class ProxyRoutes(Resource):
    """The hot routes, ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, served
    straight by the proxy; every other request goes on to ``rest`` (the Klein routes).

    Klein's URL map and Deferred wrapping cost about a tenth of a proxied request's CPU time
    (docs/BENCHMARKS.md); for these two exact paths there is nothing to match. What Klein does
    with a route's result is done the same way here: bytes are written and the request
    finished, a client that goes away cancels the request, and an unexpected failure is
    logged and answered with a 500 (or a cut connection once the answer has started)."""

    isLeaf = True
    _HOT = {b"/v1/messages": "messages", b"/v1/messages/count_tokens": "count_tokens"}

    def __init__(self, proxy: Proxy, rest):
        super().__init__()
        self._proxy = proxy
        self._rest = rest

    def render(self, request):
        op = self._HOT.get(request.path) if request.method == b"POST" else None
        if op is None:
            return self._rest.render(request)
        served = defer.ensureDeferred(self._proxy.handle(request, op))
        finished = request.notifyFinish()
        finished.addErrback(lambda _: served.cancel())
        served.addCallbacks(self._write, self._failed, callbackArgs=(request, finished),
                            errbackArgs=(request, finished))
        return NOT_DONE_YET

    @staticmethod
    def _write(body: bytes | None, request, finished) -> None:
        if finished.called:  # the client went away while the answer was made
            return
        if body:
            request.write(body)
        request.finish()

    @staticmethod
    def _failed(failure, request, finished) -> None:
        if failure.check(defer.CancelledError) and finished.called:
            return
        body = _internal_error(request, failure)
        if body is not None and not finished.called and request.channel is not None:
            request.write(body)
            request.finish()


def _internal_error(request, failure) -> bytes | None:
    log.failure("unhandled error serving {method} {path}", failure,
                method=request.method.decode("latin-1"), path=request.path.decode("latin-1"))
    if request.startedWriting:
        request.transport.abortConnection()
        return None
    return error_response(request, 500, "api_error", "internal error in ccpd; see its log")


class StoreAway(Exception):
    """Team mode: the shared store does not answer (not joined yet, or away)."""


class CcpdApp:
    app = Klein()

    def __init__(self, config, lanes, recorder, metrics, governor, store, clock):
        self.config = config
        self.lanes = lanes
        self.recorder = recorder
        self.metrics = metrics
        self.governor = governor
        self.store = store
        self.clock = clock
        self.proxy = Proxy(config, lanes, recorder, governor, clock, metrics.refused)

    def resource(self):
        """The resource tree to serve: the routes behind the :class:`Guard`."""
        return Guard(ProxyRoutes(self.proxy, self.app.resource()), self.config.server,
                     self.metrics.refused)

    # -- proxy ----------------------------------------------------------------------------------

    # POST /v1/messages and /v1/messages/count_tokens never get here: ProxyRoutes serves them.
    @app.route("/v1/<path:_rest>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                            "OPTIONS"])
    def passthrough(self, request, _rest):
        return self.proxy.handle(request, "passthrough")

    # -- usage and quotas ----------------------------------------------------------------------------

    @app.route("/v1/usage", methods=["GET"])
    def usage(self, request):
        return _json(request, views.usage_view(self.governor, self.clock.seconds()))

    @app.route("/v1/quotas", methods=["GET"])
    def quotas(self, request):
        return _json(request, views.quotas_view(self.governor))

    @app.route("/v1/quotas/reload", methods=["POST"])
    def reload_quotas(self, request):
        if (denied := self._admin_only(request)) is not None:
            return denied
        try:
            self.governor.reload()
        except QuotaError as e:
            log.warn("quota reload refused, old quotas kept: {error}", error=str(e))
            return error_response(request, 400, "invalid_request_error",
                                  f"quotas not reloaded, the old ones stay: {e}")
        return _json(request, {"reloaded": True, **views.quotas_view(self.governor)})

    @app.route("/v1/usage/sim", methods=["POST"])
    def simulate_usage(self, request):
        if (denied := self._admin_only(request)) is not None:
            return denied
        try:
            sim = _sim_request(request.content.read())
        except ValueError as e:
            return error_response(request, 400, "invalid_request_error", str(e))
        model = sim.pop("model")
        lane = self.config.route_for(model).lane  # as if its preferred lane had served it
        self.governor.account(model, lane, TokenUsage(**sim["tokens"]), seconds=sim["seconds"],
                              stream_seconds=sim["seconds"], ttft_seconds=None)
        return _json(request, {"model": model,
                               **views.model_view(self.governor, model, self.clock.seconds())})

    @app.route("/v1/usage/samples", methods=["GET"])
    async def usage_samples(self, request):
        try:
            since = _query_number(request, "since", 0.0)
            limit = int(_query_number(request, "limit", 1000, integer=True, low=1, high=10000))
            scope, instance = self._scope(request)
        except ValueError as e:
            return error_response(request, 400, "invalid_request_error", str(e))
        rows = await self._query(queries.query_samples, since, _query_text(request, "model"),
                                 limit, instance)
        models: dict[str, list] = {}
        for row in rows:
            models.setdefault(row["model"], []).append(row)
        return _json(request, {"models": models, "scope": scope, "ts": self.clock.seconds()})

    @app.route("/v1/usage/rollups", methods=["GET"])
    async def usage_rollups(self, request):
        granularity = _query_text(request, "granularity") or "hour"
        try:
            if granularity not in ("hour", "day"):
                raise ValueError(f"granularity must be hour or day, not {granularity!r}")
            since = _query_number(request, "since", 0.0)
            scope, instance = self._scope(request)
        except ValueError as e:
            return error_response(request, 400, "invalid_request_error", str(e))
        models = await self._query(queries.query_rollups, granularity,
                                   _query_text(request, "model"), since,
                                   queries.TEAM if instance is None else instance)
        return _json(request, {"granularity": granularity, "models": models, "scope": scope,
                               "ts": self.clock.seconds()})

    def _scope(self, request) -> tuple[str, str | None]:
        """``scope=team|instance`` (default team): ``(scope, the instance to show or None for
        all)``. A SQLite store has one daemon: both scopes show all of it."""
        scope = _query_text(request, "scope") or "team"
        if scope not in ("team", "instance"):
            raise ValueError(f"scope must be team or instance, not {scope!r}")
        store = self.config.store
        return scope, store.instance if scope == "instance" and store.team else None

    async def _query(self, function, *args):
        if not self.config.store.team:
            await self.store.ready  # answers wait for the start-up recovery, never miss rows
            return await self.store.store.run(function, *args)
        # a shared store may be away for long: say so instead of waiting for it
        if not self.store.ready.called:
            raise StoreAway("the team's store has not answered since ccpd started")
        try:
            return await self.store.store.run(function, *args)
        except self.store.store.errors as e:
            raise StoreAway(database_error(self.config.store.url, e)) from None

    def _admin_only(self, request) -> bytes | None:
        """None when the request may change state, else the 401 answer."""
        token = self.config.server.admin_token
        if not token:
            return None
        given = (request.getHeader(b"authorization") or b"").decode("latin-1")
        if hmac.compare_digest(given.encode("utf-8"), f"Bearer {token}".encode("utf-8")):
            return None
        return error_response(request, 401, "authentication_error",
                              "this endpoint needs 'Authorization: Bearer <admin_token>'")

    # -- ops ------------------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request):
        request.responseHeaders.setRawHeaders(b"content-type", _JSON)
        return b'{"status":"ok"}'

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request):
        # The probers' latest results; a lane's is probed here only when older than its
        # probe_interval (say the prober is late).
        results = await self.lanes.probe_all()
        unusable = self.governor.evidence.unusable  # an account problem: up, but cannot serve
        lanes = {}
        for result in results:
            lanes[result.lane] = {"up": result.up, "status": result.status,
                                  "error": result.error, "checked_at": result.checked_at,
                                  "probe_seconds": result.seconds,
                                  "usable": result.lane not in unusable,
                                  "unusable_reason": unusable.get(result.lane)}
        ready = all(result.up for result in results)
        request.setResponseCode(200 if ready else 503)
        request.responseHeaders.setRawHeaders(b"content-type", _JSON)
        logs = self.recorder.log_health()
        # A log the disk refuses, or a lane that cannot serve, degrades ccpd; it still serves.
        body = {"ready": ready, "lanes": lanes, "logs": logs,
                "degraded": bool(unusable) or not all(state["ok"] for state in logs.values())}
        team = self.governor.team
        if team is not None:  # team mode: deciding on the team's usage, or on its own
            body["team"] = team.view()
            body["degraded"] = body["degraded"] or not team.up
        if not ready:
            body["failing"] = sorted(name for name, lane in lanes.items() if not lane["up"])
        return json.dumps(body).encode("utf-8")

    @app.route("/metrics", methods=["GET"])
    def metrics_exposition(self, request):
        request.responseHeaders.setRawHeaders(b"content-type", [self.metrics.content_type.encode()])
        return self.metrics.exposition()

    # -- dashboard (ccpd/web/dashboard.py): one page and its two files, nothing else -------------

    @app.route("/", methods=["GET", "HEAD"])
    @app.route("/dashboard", methods=["GET", "HEAD"])
    def dashboard_page(self, request):
        return dashboard.serve(request, dashboard.PAGE)

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def dashboard_asset(self, request, name):
        body = dashboard.serve(request, name)
        if body is None:
            return error_response(request, 404, "not_found_error",
                                  f"ccpd has no route for {request.path.decode('latin-1')}")
        return body

    # -- errors ---------------------------------------------------------------------------------

    @app.handle_errors(NotFound, RequestRedirect)  # RequestRedirect: "/v1//usage"
    def not_found(self, request, failure):
        return error_response(request, 404, "not_found_error",
                              f"ccpd has no route for {request.path.decode('latin-1')}")

    @app.handle_errors(StoreAway)
    def store_away(self, request, failure):
        return error_response(request, 503, "api_error",
                              f"ccpd's history is in the team's store at "
                              f"{self.store.store.location}, which does not answer "
                              f"({failure.value}); the proxy serves meanwhile")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        return error_response(request, 405, "invalid_request_error",
                              f"{request.method.decode('latin-1')} is not allowed on "
                              f"{request.path.decode('latin-1')}")

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        return _internal_error(request, failure)

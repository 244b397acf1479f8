"""The Klein application: proxy routes, ops endpoints, and the Site that serves them.

State lives on the :class:`CcpdApp` instance (Klein's "non-global state" pattern), so tests
build one over fakes and drive it with ``StubTreq`` or a real listening port.
"""
from __future__ import annotations

import json

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ccpd.web.proxy import Proxy, error_response

log = Logger()
_JSON = [b"application/json"]


class CcpdRequest(server.Request):
    """A request that stops storing its body once it is larger than the site allows."""

    body_too_large = False
    _body_size = 0
    # No "text/html" stamped on bodies that came without a content type: we pass them through.
    defaultContentType = None

    def _limit(self) -> int:
        return self.channel.site.max_body_bytes  # self.site is only set once the body is in

    def gotLength(self, length):
        if length is not None and length > self._limit():
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._body_size += len(data)
        if self._body_size > self._limit():
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


class CcpdSite(server.Site):
    """The site: usage.jsonl is ccpd's access log, so the per-request access line is off."""

    requestFactory = CcpdRequest
    noisy = False

    def __init__(self, resource, max_body_bytes: int, **kwargs):
        super().__init__(resource, **kwargs)
        self.max_body_bytes = max_body_bytes

    def log(self, request):
        pass


class CcpdApp:
    app = Klein()

    def __init__(self, config, lanes, recorder, metrics, clock):
        self.config = config
        self.lanes = lanes
        self.metrics = metrics
        self.clock = clock
        self.proxy = Proxy(config, lanes, recorder, clock)

    def resource(self):
        return self.app.resource()

    # -- proxy ----------------------------------------------------------------------------------

    @app.route("/v1/messages", methods=["POST"])
    def messages(self, request):
        return self.proxy.handle(request, "messages")

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    def count_tokens(self, request):
        return self.proxy.handle(request, "count_tokens")

    @app.route("/v1/<path:_rest>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                            "OPTIONS"])
    def passthrough(self, request, _rest):
        return self.proxy.handle(request, "passthrough")

    # -- ops ------------------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request):
        request.responseHeaders.setRawHeaders(b"content-type", _JSON)
        return b'{"status":"ok"}'

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request):
        results = await defer.gatherResults([lane.probe() for lane in self.lanes])
        lanes = {}
        for result in results:
            self.metrics.lane_up.labels(result.lane).set(1 if result.up else 0)
            lanes[result.lane] = {"up": result.up, "status": result.status,
                                  "error": result.error, "checked_at": result.checked_at}
        ready = all(result.up for result in results)
        request.setResponseCode(200 if ready else 503)
        request.responseHeaders.setRawHeaders(b"content-type", _JSON)
        body = {"ready": ready, "lanes": lanes}
        if not ready:
            body["failing"] = sorted(name for name, lane in lanes.items() if not lane["up"])
        return json.dumps(body).encode("utf-8")

    @app.route("/metrics", methods=["GET"])
    def metrics_exposition(self, request):
        request.responseHeaders.setRawHeaders(b"content-type", [self.metrics.content_type.encode()])
        return self.metrics.exposition()

    # -- errors ---------------------------------------------------------------------------------

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        return error_response(request, 404, "not_found_error",
                              f"ccpd has no route for {request.path.decode('latin-1')}")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        return error_response(request, 405, "invalid_request_error",
                              f"{request.method.decode('latin-1')} is not allowed on "
                              f"{request.path.decode('latin-1')}")

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        log.failure("unhandled error serving {method} {path}", failure,
                    method=request.method.decode("latin-1"), path=request.path.decode("latin-1"))
        if request.startedWriting:
            request.transport.abortConnection()
            return None
        return error_response(request, 500, "api_error", "internal error in ccpd; see its log")

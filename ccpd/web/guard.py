"""Who may use ccpd: checks made on every request before any routing.

ccpd holds the user's keys, and any page in the user's browser can send requests to
127.0.0.1. Two browser tricks would let a page spend the user's plan: DNS rebinding (a name of
the attacker's resolves to 127.0.0.1, and the browser sends that name as ``Host``) and
cross-site "simple" POSTs (``content-type: text/plain``, no preflight, but an ``Origin``).
So a request must name ccpd itself as its ``Host`` and may only carry an ``Origin`` that is
ccpd's own or listed; on a listen reachable from the network, clients also need a token.
"""
from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from urllib.parse import unquote_to_bytes

from twisted.web.resource import Resource

from ccpd.config import ServerConfig
from ccpd.web.errors import ApiError, api_error_response

_LOOPBACK_NAMES = ("localhost", "localhost.")
_OPEN_PATHS = frozenset({b"/healthz"})  # liveness checks need no client token
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*\Z")


def split_host(host: str) -> tuple[str, int | None]:
    """``(name, port)`` of a Host header value; ``port`` None when absent, -1 when bad."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    else:
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
    if not port:
        return name, None
    return name, int(port) if port.isdigit() and len(port) <= 5 else -1


@functools.lru_cache(maxsize=256)  # a client sends the same Host with every request
def _is_loopback(name: str) -> bool:
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard(Resource):
    """Wraps ccpd's resource tree: refused requests get an Anthropic-shaped answer and never
    reach a route, a lane or a log line; the others are served by ``inner`` unchanged (minus
    the client token, which is never forwarded)."""

    isLeaf = True

    def __init__(self, inner, server: ServerConfig, refused_counter):
        super().__init__()
        self._inner = inner
        self._allowed_hosts = frozenset(server.allowed_hosts)
        self._allowed_origins = frozenset(server.allowed_origins)
        self._tokens = tuple(token.encode("utf-8") for token in server.client_tokens)
        self._refused = refused_counter  # labels: reason

    def render(self, request):
        try:
            self.check(request)
        except ApiError as refusal:
            return api_error_response(request, refusal)
        return self._inner.render(request)

    def check(self, request) -> None:
        """Raise :class:`ApiError` for a request ccpd must not serve."""
        host = request.getHeader(b"host")
        if host is not None and not self._host_allowed(request, host):
            self._count("host")
            raise ApiError(421, "permission_error",
                           f"ccpd does not answer to Host {host[:200]!r}: it serves its "
                           f"loopback address and [server] allowed_hosts only")
        origin = request.getHeader(b"origin")
        if origin is not None and not self._origin_allowed(origin, host):
            self._count("origin")
            raise ApiError(403, "permission_error",
                           f"requests from the web page at {origin[:200]!r} are refused; "
                           f"add the origin to [server] allowed_origins to allow it")
        if self._tokens and request.path not in _OPEN_PATHS and not self._take_token(request):
            self._count("client_token")
            raise ApiError(401, "authentication_error",
                           "ccpd needs a client token: send it as x-api-key or "
                           "'Authorization: Bearer <token>'")
        # Only origin-form targets: Twisted routes "x/v1/messages" as "/v1/messages", and a
        # lane's URL is its base + the target, so any other form could change the lane's host.
        # Of visible ASCII only, as an HTTP client may send (Twisted lets DEL and bytes > 0x7f
        # through to the request).
        if not _ORIGIN_FORM.match(request.uri):
            self._count("bad_target")
            raise ApiError(400, "invalid_request_error",
                           "the request-target must be a path starting with / (visible ASCII; "
                           "percent-encode the rest)")
        try:
            unquote_to_bytes(request.path).decode("utf-8")
            if host is not None:
                host.decode("utf-8")
        except UnicodeDecodeError:
            self._count("bad_target")
            raise ApiError(400, "invalid_request_error",
                           "the URL is not UTF-8 once percent-decoded") from None

    def _count(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def _host_allowed(self, request, host_header: bytes) -> bool:
        host = host_header.decode("latin-1").strip().lower()
        if host in self._allowed_hosts:
            return True
        name, port = split_host(host)
        if name in self._allowed_hosts:
            return True
        local = request.getHost()
        local_port = getattr(local, "port", None)  # None for a unix socket
        if port is None:
            port = 443 if request.isSecure() else 80
        if local_port is not None and port != local_port:
            return False
        # An IP literal cannot be rebound, so the address the client connected to is fine.
        return _is_loopback(name) or name == getattr(local, "host", None)

    def _origin_allowed(self, origin_header: bytes, host: bytes | None) -> bool:
        origin = origin_header.decode("latin-1").strip().lower().rstrip("/")
        if origin in self._allowed_origins:
            return True
        # ccpd's own pages: same origin as the (already checked) Host.
        return host is not None and origin in ("http://" + host.decode("latin-1").lower(),
                                               "https://" + host.decode("latin-1").lower())

    def _take_token(self, request) -> bool:
        """Whether the request carries a client token; the headers that carried it are
        removed, so that it never reaches a lane."""
        headers = request.requestHeaders
        candidates = [(b"x-api-key", value) for value in headers.getRawHeaders(b"x-api-key", [])]
        for value in headers.getRawHeaders(b"authorization", []):
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer":
                candidates.append((b"authorization", credential.strip()))
        # Compared with every token, each in constant time: no early exit to time. Every
        # header that carries a token is removed, not only the first.
        carrying = {name for name, credential in candidates
                    if any([hmac.compare_digest(credential, token) for token in self._tokens])}
        for name in carrying:
            headers.removeHeader(name)
        return bool(carrying)

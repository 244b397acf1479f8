"""The live dashboard: one HTML page and its script and style sheet, served by ccpd itself.

The files are package data (``ccpd/web/static/``), read once at first use and kept in memory.
Nothing is built and nothing comes from elsewhere: the page loads only these files and fetches
only ccpd's own JSON endpoints (``/v1/usage``, ``/v1/usage/samples``, ``/v1/usage/rollups``,
``/readyz``), same origin, which the :class:`~ccpd.web.guard.Guard` lets through. Its charts
are drawn by its own script (SVG); no library is vendored.

Every answer carries a strict Content-Security-Policy (no inline script or style, no other
origin, no framing), ``cache-control: no-cache`` (an upgraded ccpd serves its new page at the
next load) and ``x-content-type-options: nosniff``.
"""
from __future__ import annotations

import functools
from importlib import resources

# The only files served, with their content types: anything else is a 404.
ASSETS = {
    "dashboard.html": b"text/html; charset=utf-8",
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
}
PAGE = "dashboard.html"

CSP = (b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
       b"frame-ancestors 'none'")
_HEADERS = (
    (b"content-security-policy", CSP),
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)

@functools.cache
def asset_bytes(name: str) -> bytes:
    """The content of one of :data:`ASSETS` (read once); KeyError for any other name."""
    if name not in ASSETS:
        raise KeyError(name)
    return (resources.files("ccpd.web") / "static" / name).read_bytes()


def serve(request, name: str) -> bytes | None:
    """The answer to a GET or HEAD of asset ``name`` (headers set on ``request``), or None
    when ccpd has no such asset."""
    if name not in ASSETS:
        return None
    content = asset_bytes(name)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [ASSETS[name]])
    for header, value in _HEADERS:
        headers.setRawHeaders(header, [value])
    return content

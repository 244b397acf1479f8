"""Answers ccpd makes itself, in Anthropic's error shape.

:class:`ApiError` is the one exception for a refusal or failure of ccpd's own; it becomes an
answer in one place (:func:`error_response`), so every such answer looks the same to a client.
"""
from __future__ import annotations

import json


class ApiError(Exception):
    """A refusal or failure of ccpd's own, as the client will see it.

    ``anomaly``: the kind of the anomaly line a proxied request that ends this way gets
    (``api_error``, ``timeout_error``, ``quota_blocked``, …; None for a refusal of the
    client's own request), with ``detail`` (default: the message)."""

    def __init__(self, status: int, error_type: str, message: str,
                 headers: tuple[tuple[bytes, bytes], ...] = (), anomaly: str | None = None,
                 detail: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers
        self.anomaly = anomaly
        self.detail = detail


def error_body(error_type: str, message: str) -> bytes:
    """Anthropic's error shape."""
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}
                      ).encode("utf-8")


def error_response(request, status: int, error_type: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return error_body(error_type, message)


def api_error_response(request, error: ApiError) -> bytes:
    for name, value in error.headers:
        request.responseHeaders.setRawHeaders(name, [value])
    return error_response(request, error.status, error.error_type, error.message)


def sse_error_event(error_type: str, message: str) -> bytes:
    return b"event: error\ndata: " + error_body(error_type, message) + b"\n\n"

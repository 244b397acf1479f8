"""The HTTP server side of ccpd: connection hygiene below the resource tree.

Bodies over ``max_body_bytes`` are not stored (the proxy answers 413); a client must send a
request's headers within ``header_timeout_s`` (a slow-headers client cannot hold a connection
open by trickling bytes); headers over :data:`MAX_HEADER_BYTES` get a 431 in Anthropic's shape
instead of a dropped connection.
"""
from __future__ import annotations

from twisted.web import http, server
# Imported by name: every attribute looked up on the twisted.web.http module goes through its
# deprecation proxy, a measurable cost on a path run for every request body.
from twisted.web.http import _ChunkedTransferDecoder

from ccpd.web.errors import error_body

# Request line plus headers. Claude Code sends about 2 KB; Node's own limit is 16 KB.
MAX_HEADER_BYTES = 32 * 1024
# After refusing, ccpd keeps reading (and dropping) what the client still sends for this long
# before it closes: closing with unread data would reset the connection, and the client might
# lose the answer before reading it. A client that reads the answer closes first.
LINGER_SECONDS = 2.0


class CcpdRequest(server.Request):
    """A request that stops storing its body once it is larger than the site allows."""

    body_too_large = False
    body_size = 0  # bytes of the body received so far
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
        self.body_size += len(data)
        if self.body_size > self._limit():
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


def _raw_answer(status: int, reason: bytes, error_type: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for refusals made before there is
    a request object to answer through."""
    body = error_body(error_type, message)
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


class CcpdChannel(http.HTTPChannel):
    """An HTTP channel with a deadline for request headers and a 431 for oversized ones."""

    MAX_LENGTH = MAX_HEADER_BYTES
    # Twisted's own check answers a bare 400; ours (counting line ends too) trips first.
    totalHeadersSize = MAX_HEADER_BYTES
    _header_bytes = 0
    _header_timer = None
    _in_request = False
    _refused = False
    _linger = None

    def connectionMade(self):
        super().connectionMade()
        self._start_header_clock()

    def dataReceived(self, data):
        if self._refused:
            return  # lingering after a refusal: drain and drop
        if not self._in_request and self._header_timer is None:
            self._start_header_clock()  # the first byte of a following request
        super().dataReceived(data)

    def lineReceived(self, line):
        if self._refused:
            return
        self._header_bytes += len(line) + 2
        if self._header_bytes > MAX_HEADER_BYTES:
            return self._refuse_headers()
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        self._refuse_headers()

    def rawDataReceived(self, data):
        super().rawDataReceived(data)
        # A chunk is read as it arrives, so a chunk-size past the body limit (up to any number
        # of hex digits: 2**80 parses) would keep the connection waiting for bytes that ccpd
        # will not keep anyway. Refused as soon as its size line is in.
        decoder = self._transferDecoder
        if (not self._refused and isinstance(decoder, _ChunkedTransferDecoder)
                and decoder.state == "BODY" and self.requests
                and self.requests[-1].body_size + decoder.length > self.site.max_body_bytes):
            self.site.count_refusal("body_too_large")
            self._refuse(_raw_answer(413, b"Request Entity Too Large", "request_too_large",
                                     f"request body exceeds {self.site.max_body_bytes} bytes"))

    def allHeadersReceived(self):
        self._stop_header_clock()
        self._in_request = True
        self._header_bytes = 0
        super().allHeadersReceived()

    def requestDone(self, request):
        self._in_request = False
        super().requestDone(request)

    def connectionLost(self, reason):
        self._stop_header_clock()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)

    # -- refusals -------------------------------------------------------------------------------

    def _start_header_clock(self) -> None:
        timeout = self.site.header_timeout
        if timeout:
            self._header_timer = self.callLater(timeout, self._headers_timed_out)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        self.site.count_refusal("header_timeout")
        self.transport.abortConnection()

    def _refuse_headers(self) -> None:
        self.site.count_refusal("headers_too_large")
        self._refuse(_raw_answer(431, b"Request Header Fields Too Large", "invalid_request_error",
                                 f"request headers exceed {MAX_HEADER_BYTES} bytes"))

    def _refuse(self, answer: bytes) -> None:
        self._refused = True
        self._stop_header_clock()
        self.transport.write(answer)
        self._linger = self.callLater(LINGER_SECONDS, self.transport.loseConnection)


class CcpdSite(server.Site):
    """The site: usage.jsonl is ccpd's access log, so the per-request access line is off."""

    requestFactory = CcpdRequest
    protocol = CcpdChannel
    noisy = False

    def __init__(self, resource, max_body_bytes: int, header_timeout: float = 30.0,
                 refused_counter=None, **kwargs):
        # Bodies are passed on as they are, never parsed as HTML form submissions; that also
        # saves a costly content-type parse (an email.message per request).
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self._refused = refused_counter

    def count_refusal(self, reason: str) -> None:
        if self._refused is not None:
            self._refused.labels(reason).inc()

    def log(self, request):
        pass

"""The in-stack floor: the leanest relay Twisted's own HTTP server and client make.

ccpd's cost is judged beside this: a ``twisted.web.server.Site`` with one leaf resource that
forwards every request (method, path, end-to-end headers, body) through
``twisted.web.client.Agent`` on a persistent ``HTTPConnectionPool`` and relays the answer's
status, headers and body back as its chunks arrive. No routing, accounting, guard or logging:
whatever ccpd spends beyond this floor is ccpd's own.

Run: ``python scripts/bench/floor.py --port-file F --upstream http://127.0.0.1:N [--port P]``.
It uses the epoll reactor, the one ``twistd`` gives ccpd on Linux.
"""
from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.web import resource, server  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone  # noqa: E402
from twisted.web.http import PotentialDataLoss  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer  # noqa: E402
from zope.interface import implementer  # noqa: E402

# Hop-by-hop headers (RFC 9110 7.6.1) plus those Twisted computes itself for each side.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
    b"host", b"content-length"})
MAX_PERSISTENT = 128  # as ccpd's lane default (max_connections)


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory, written in one go with its content-length."""

    def __init__(self, body: bytes):
        self.body, self.length = body, len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """The upstream's endpoint, built once (a plain Agent builds one, with IDNA, per request)."""

    def __init__(self, host: str, port: int):
        self.endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=10)

    def endpointForURI(self, uri):
        return self.endpoint


class _Relay(Protocol):
    """Writes each chunk of the upstream body to the client as it comes; finishes at the end."""

    def __init__(self, request: server.Request):
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason) -> None:
        request = self.request
        if request._disconnected or request.finished:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:  # the upstream broke off: so must the answer
            request.channel.transport.abortConnection()


class Floor(resource.Resource):
    isLeaf = True

    def __init__(self, upstream: str, agent: Agent):
        super().__init__()
        self.upstream = upstream.rstrip("/").encode("ascii")
        self.agent = agent

    def render(self, request: server.Request):
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                headers.setRawHeaders(name, values)
        body = request.content.read()
        d = self.agent.request(request.method, self.upstream + request.uri, headers,
                               _Body(body) if body or request.method == b"POST" else None)
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request,),
                       errbackArgs=(request,))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    @staticmethod
    def _answer(response, request: server.Request) -> None:
        if request._disconnected:
            response.deliverBody(Protocol())  # read and drop; the connection goes back to the pool
            return
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                out.setRawHeaders(name, values)
        if response.length is not None and response.length is not UNKNOWN_LENGTH:
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        response.deliverBody(_Relay(request))

    @staticmethod
    def _failed(failure, request: server.Request) -> None:
        if request._disconnected or request.finished:
            return  # cancelled because the client went away
        request.setResponseCode(502)
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"type":"error","error":{"type":"api_error",'
                      b'"message":"floor: upstream failed"}}')
        request.finish()


class QuietSite(server.Site):
    """No access log line per request."""

    def log(self, request) -> None:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the port here once listening")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.split("://", 1)[1].rstrip("/").partition(":")
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT
    agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(host, int(port or 80)), pool=pool)
    site = QuietSite(Floor(args.upstream, agent), parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    server.Request.defaultContentType = None  # no content type added to answers without one
    listening = reactor.listenTCP(args.port, site, backlog=511, interface="127.0.0.1")
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(listening.getHost().port))
        os.replace(tmp, args.port_file)
    else:
        print(listening.getHost().port, flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

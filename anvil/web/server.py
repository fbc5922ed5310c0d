# -*- test-case-name: tests.test_web_root -*-
"""
The HTTP site of the API listener: request ids, timing, metrics, access log.

L{AnvilSite} is the L{twisted.web.server.Site} the node listens with; its
requests are L{AnvilRequest}s. Everything that must happen for I{every}
request, whichever resource answers it, lives here rather than in the
resources:

  - a fresh S3-style request id in C{x-amz-request-id} / C{x-amz-id-2};
  - C{Server: Anvil} instead of Twisted's version banner;
  - one C{anvil_api_request_duration_seconds} observation and one
    C{anvil_api_requests_total} increment when the request ends, whether it
    finished or the client went away;
  - one access-log event through L{twisted.logger}.

Resources only label the request: they set C{request.anvil_api} and
C{request.anvil_operation} (see L{AnvilRequest}).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from anvil.metrics import API_NODE, API_S3, Metrics

SERVER_NAME = b"Anvil"
"""The C{Server} header value (AWS sends C{AmazonS3})."""

UNKNOWN_OPERATION = "Unknown"
"""The operation label of a request no resource has classified."""

CLIENT_CLOSED_REQUEST = 499
"""
The status recorded for a request whose client hung up before the response
was complete (nginx's convention). It is never sent; it puts abandoned
requests in the 4xx class of the metrics, apart from successes and from
server errors.
"""


def new_request_id() -> str:
    """
    Make a request id in the form AWS uses.

    @return: 16 upper-case hexadecimal characters from 64 random bits; a
        collision needs about 2**32 requests, and ids are only ever used to
        find one request in logs, so randomness beats coordination here.
    """
    return os.urandom(8).hex().upper()


def new_host_id() -> str:
    """
    Make an extended request id for C{x-amz-id-2}.

    AWS documents this value only as an opaque token for support requests;
    SDKs copy it into errors and logs. Ours is random base64, like theirs.

    @return: 44 base64 characters.
    """
    return base64.b64encode(os.urandom(32)).decode("ascii")


class AnvilRequest(Request):
    """
    A request on the API listener.

    It stays minimal on purpose. A later issue streams request bodies
    (PutObject, UploadPart) into the storage layer instead of buffering them
    in C{request.content}; it will do so by overriding C{gotLength} and
    C{handleContentChunk} here, which is why this class exists separately
    from L{AnvilSite} and why it keeps no state that assumes a buffered
    body.

    @ivar request_id: This request's id, also sent as C{x-amz-request-id};
        S3 error documents repeat it as C{RequestId}.
    @ivar host_id: The value sent as C{x-amz-id-2}; error documents repeat it
        as C{HostId}.
    @ivar anvil_api: The C{api} metric label. Starts as C{"s3"}; the node
        endpoints set C{"node"}.
    @ivar anvil_operation: The C{operation} metric label. Starts as
        C{"Unknown"}; whichever resource recognises the request sets the
        operation name (C{"GetObject"}, C{"Health"}, ...). It must come from
        a fixed set of names, never from the request itself.
    @ivar started: When the request line arrived, in the site clock's
        seconds; the recorded duration therefore includes receiving the body.
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        """
        @param channel: The HTTP channel; its C{site} must be an
            L{AnvilSite}, which provides the clock and the metrics.
        @param args: Passed on to L{twisted.web.server.Request}.
        @param kwargs: Passed on to L{twisted.web.server.Request}.
        """
        super().__init__(channel, *args, **kwargs)
        site = channel.site
        if not isinstance(site, AnvilSite):
            raise TypeError(f"AnvilRequest needs an AnvilSite, not {site!r}")
        self._anvil_site = site
        self.started = site.reactor.seconds()
        self.request_id = new_request_id()
        self.host_id = new_host_id()
        self.anvil_api = API_S3
        self.anvil_operation = UNKNOWN_OPERATION
        # Set now, before any resource runs, so every response carries them
        # (including Twisted's own error pages and 400s from resources).
        self.responseHeaders.setRawHeaders(
            b"x-amz-request-id", [self.request_id.encode("ascii")]
        )
        self.responseHeaders.setRawHeaders(b"x-amz-id-2", [self.host_id.encode("ascii")])
        # notifyFinish fires on finish() and errbacks on connectionLost()
        # before finish(), so this records every request exactly once.
        self.notifyFinish().addBoth(self._ended).addErrback(
            lambda reason: self._log.failure(
                "Recording request {request_id} failed", reason, request_id=self.request_id
            )
        )

    def write(self, data: bytes) -> None:
        """
        Write response data, replacing Twisted's C{Server} header first.

        L{twisted.web.server.Request.process} sets C{Server: TwistedWeb/...}
        just before rendering, after anything this class could set, and a
        resource may write the headers during render. The first write is
        the last moment the header can still be changed.

        @param data: Body bytes, as for L{Request.write}.
        """
        if not self.startedWriting:
            self.responseHeaders.setRawHeaders(b"Server", [SERVER_NAME])
        super().write(data)

    def _ended(self, result: object) -> None:
        """
        Report this request to the site once it is over.

        @param result: C{None} when the response was finished, a L{Failure}
            when the connection was lost first.
        """
        if isinstance(result, Failure) and self.code < 500:
            # The client went away before the response was complete. A code
            # of 500 or more means a resource was reporting its own failure
            # (or set it before aborting a broken stream), which stays 5xx.
            status = CLIENT_CLOSED_REQUEST
        else:
            status = self.code
        self._anvil_site.request_ended(self, status)


class AnvilSite(Site):
    """
    The site of the API listener: Twisted's L{Site} with L{AnvilRequest}s,
    metrics and an access log through L{twisted.logger}.

    Form bodies are not parsed into C{request.args}: S3 bodies are object
    data, and Twisted's form parsing would read a whole multipart upload
    into memory.

    @ivar metrics: Where request metrics are recorded.
    """

    requestFactory = AnvilRequest
    _log = Logger()

    def __init__(self, resource: IResource, metrics: Metrics, reactor: IReactorTime) -> None:
        """
        @param resource: The root resource (normally
            L{anvil.web.root.RootResource}).
        @param metrics: The node's metrics.
        @param reactor: Provides C{seconds()} for request timing and
            C{callLater} for Twisted's connection timeouts.
        """
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.metrics = metrics

    def log(self, request: Any) -> None:
        """
        Write nothing to Twisted's legacy access log.

        L{HTTPFactory.log} writes combined-log-format lines through
        C{twisted.python.log} on C{finish()} only; L{request_ended} logs
        every request, abandoned ones included, through L{twisted.logger}.

        @param request: The finished request (ignored).
        """

    def request_ended(self, request: AnvilRequest, status: int) -> None:
        """
        Record one request that is over.

        @param request: The request.
        @param status: The status code sent, or L{CLIENT_CLOSED_REQUEST}.
        """
        seconds = self.reactor.seconds() - request.started
        self.metrics.observe_request(
            request.anvil_api, request.anvil_operation, status, seconds
        )
        # The path without the query: presigned URLs carry their signature
        # in the query, and a log line must not be a usable credential.
        # A client that hung up before its request line was parsed has no
        # path yet.
        path = (getattr(request, "path", None) or b"-").decode("ascii", "replace")
        address = request.getClientAddress()
        emit = self._log.debug if request.anvil_api == API_NODE else self._log.info
        emit(
            "{client} {method} {path} {status} {duration_ms:.1f}ms "
            "request_id={request_id} {api}:{operation}",
            client=getattr(address, "host", "-"),
            method=request.method.decode("ascii", "replace"),
            path=path,
            status=status,
            duration_ms=seconds * 1000,
            request_id=request.request_id,
            api=request.anvil_api,
            operation=request.anvil_operation,
        )

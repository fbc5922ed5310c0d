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

Requests are dispatched as soon as their headers are complete, not once
their whole body has arrived as twisted.web does: the resource reads the
body as it streams in through C{request.body} (a
L{anvil.web.body.RequestBody}), with flow control, and C{request.content}
stays empty. L{AnvilChannel} implements this and keeps a connection's
requests in order:

  - the next request on a keep-alive connection is parsed only after the
    current response is finished I{and} the current body has arrived in
    full (read or discarded);
  - a response finished before its body was read (an early error) is
    followed by draining and discarding the rest of the body when that rest
    is at most L{AnvilChannel.drain_limit} bytes, and the connection is
    reused; otherwise the response carries C{Connection: close} and the
    connection is closed after it (after a bounded linger that discards what
    the client is still sending, so it gets to read the response instead of
    a reset);
  - C{Expect: 100-continue} is answered when the resource first reads the
    body, so a request rejected without reading its body never makes the
    client send it (the connection is then closed after the response: the
    client may or may not send the body anyway).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from anvil.metrics import API_NODE, API_S3, Metrics
from anvil.web.body import MiB, RequestBody

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
        The bits come from L{random} (seeded from the system at start and
        again in a forked child), not L{os.urandom}: an id is no secret,
        and a system call for each of two ids per request is measurable
        in small-request rates.
    """
    return "%016X" % random.getrandbits(64)


def new_host_id() -> str:
    """
    Make an extended request id for C{x-amz-id-2}.

    AWS documents this value only as an opaque token for support requests;
    SDKs copy it into errors and logs. Ours is random base64, like theirs.

    @return: 44 base64 characters (random bits as in L{new_request_id}).
    """
    return base64.b64encode(random.getrandbits(256).to_bytes(32, "big")).decode("ascii")


class AnvilRequest(Request):
    """
    A request on the API listener.

    Its body streams in through L{body} while the resource runs (see
    L{AnvilChannel}); C{request.content} is always an empty L{BytesIO}, so
    Twisted code that seeks or reads it sees an empty body rather than
    failing.

    @ivar body: The request body. For a request without a body
        (C{content_length} 0) it has ended before the resource is rendered,
        and C{read()} returns C{b""} at once.
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
        # Replaced in gotLength, once the headers tell how long the body is.
        self.body = RequestBody(0)
        self._dispatched = False
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
            if self._dispatched and not self.body.ended and self.channel is not None:
                self._answering_before_body()
        super().write(data)

    def _answering_before_body(self) -> None:
        """
        Decide, as the response headers are about to be sent while the body
        has not fully arrived, whether the connection can be reused.

        It can when the rest of the body is known to be short enough to
        drain (L{AnvilChannel.drain_limit}); not when it is long or of
        unknown length (chunked), nor when the client still waits for
        C{100 Continue}, because such a client may or may not send the body
        now, and the next bytes could then be either a body or a request.
        The resource may still read the whole body after this (then the
        connection closes after a complete exchange, which is harmless).
        """
        body = self.body
        limit = getattr(self.channel, "drain_limit", 0)
        if body.content_length is None:
            remaining = None
        else:
            remaining = body.content_length - body.bytes_received
        if body.continue_pending or remaining is None or remaining > limit:
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.channel.persistent = False

    def gotLength(self, length: int | None, send_continue: Callable[[], None] | None = None) -> None:
        """
        Create the L{RequestBody} that receives this request's body.

        Called by the channel once the headers are complete.

        @param length: The C{Content-Length}; C{None} for a chunked body; 0
            when the request has no body.
        @param send_continue: Sends C{100 Continue} if the client asked for
            it (see L{RequestBody}).
        """
        # Twisted code (Request.requestReceived, Request._cleanup) seeks,
        # tells and closes the content buffer; keep it, but empty.
        self.content = BytesIO()
        reading = getattr(self.channel, "body_reading", None) if length != 0 else None
        self.body = RequestBody(length, reading, send_continue)

    def handleContentChunk(self, data: bytes) -> None:
        """
        Hand the next piece of the body to L{body} instead of buffering it
        in C{content}.

        @param data: Body bytes, with any chunked framing removed.
        """
        self.body.data_received(data)

    def dispatch_early(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Start handling this request now that its headers are complete,
        before its body has arrived.

        Called by L{AnvilChannel}: sets C{method}, C{uri}, C{path}, C{args}
        and C{clientproto} and calls C{process()}, as
        L{twisted.web.http.Request.requestReceived} does after a whole body.

        @param command: The method, as sent.
        @param path: The request target.
        @param version: The HTTP version, such as C{b"HTTP/1.1"}.
        """
        self._dispatched = True
        super().requestReceived(command, path, version)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        The whole body has arrived: end L{body}, and handle the request now
        unless it was already dispatched when its headers arrived (requests
        without a body are handled here, as Twisted does).

        @param command: The method, as sent.
        @param path: The request target.
        @param version: The HTTP version.
        """
        self.body.end_received()
        if not self._dispatched:
            super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        """
        The connection closed: fail a body that has not fully arrived.

        The request is marked disconnected (and C{notifyFinish} fails)
        I{before} a waiting C{body.read()} raises, so a handler reacting to
        the failed read already finds writes disabled.

        @param reason: Why the connection closed.
        """
        super().connectionLost(reason)
        self.body.connection_lost()

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


_CHANNEL = "channel"
_BODY = "body"


@implementer(IPushProducer)
class _ReadGate:
    """
    Pauses reading from a connection while I{anyone} wants it paused.

    It stands in for the transport as L{HTTPChannel}'s network producer.
    Two parties pause and resume reading, for different reasons, and
    neither may undo the other's pause:

      - the channel itself (Twisted's code): while a response cannot be
        written fast enough, or while pipelined requests pile up behind the
        one being handled; its calls are not paired (it resumes
        unconditionally when a request is done), so it is tracked as one
        on/off wish;
      - the request body (L{RequestBody}): while too much of it is unread.

    The transport is paused when the first wish appears and resumed when
    the last one goes away.
    """

    def __init__(self, network: Any) -> None:
        """
        @param network: The transport (an L{IPushProducer} and consumer), or
            Twisted's stand-in for a transport that is not a producer.
        """
        self._network = network
        self._holders: set[str] = set()
        self._registered = True

    def held_by(self, holder: str) -> bool:
        """
        @param holder: C{"channel"} or C{"body"}.
        @return: Whether C{holder} currently wants reading paused.
        """
        return holder in self._holders

    def hold(self, holder: str) -> None:
        """
        Record that C{holder} wants reading paused; pause if nobody did yet.

        @param holder: C{"channel"} or C{"body"}.
        """
        if holder in self._holders:
            return
        self._holders.add(holder)
        if len(self._holders) == 1 and self._registered:
            self._network.pauseProducing()

    def release(self, holder: str) -> None:
        """
        Drop C{holder}'s wish; resume reading if nobody else wants a pause.

        @param holder: C{"channel"} or C{"body"}.
        """
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        if not self._holders and self._registered:
            self._network.resumeProducing()

    def pauseProducing(self) -> None:
        """
        The channel wants reading paused.
        """
        self.hold(_CHANNEL)

    def resumeProducing(self) -> None:
        """
        The channel no longer wants reading paused.
        """
        self.release(_CHANNEL)

    def stopProducing(self) -> None:
        """
        Stop the transport.
        """
        self._network.stopProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Register the channel as the transport's producer (what Twisted calls
        on the network producer when the connection starts).

        @param producer: The channel.
        @param streaming: Always C{True}.
        """
        self._network.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        """
        The channel is closing the connection: unregister it from the
        transport and stop pausing or resuming a transport that is going
        away.
        """
        self._registered = False
        self._network.unregisterProducer()


@implementer(IPushProducer)
class _BodyReading:
    """
    What a L{RequestBody} pauses and resumes: the body's wish on the
    channel's L{_ReadGate}.
    """

    def __init__(self, gate: _ReadGate) -> None:
        """
        @param gate: The connection's gate.
        """
        self._gate = gate

    def pauseProducing(self) -> None:
        """
        Too much of the body is unread: stop reading from the connection.
        """
        self._gate.hold(_BODY)

    def resumeProducing(self) -> None:
        """
        The body has room again: resume reading if nothing else objects.
        """
        self._gate.release(_BODY)

    def stopProducing(self) -> None:
        """
        Nothing to do: the body never stops the connection itself.
        """


class AnvilChannel(HTTPChannel):
    """
    An HTTP/1.1 connection whose requests are dispatched when their headers
    are complete, with the body streaming in afterwards.

    This builds on L{HTTPChannel} (checked against Twisted 26): the channel
    creates the request at the request line, calls C{allHeadersReceived}
    at the blank line, feeds the body through the request's
    C{handleContentChunk}, and calls C{allContentReceived} (which calls the
    request's C{requestReceived}) when the body is complete; from then until
    C{requestDone}, later bytes are buffered as pipelined data and only
    parsed after the response is finished. Here:

      - C{allHeadersReceived} calls the request's C{dispatch_early} for a
        request that has a body (bodiless ones are dispatched by
        C{allContentReceived}, immediately after, as in Twisted);
      - C{requestDone} for a response that finished before its body arrived
        does not start the next request: the rest of the body is drained
        first (or the connection is closed, see
        L{AnvilRequest._answering_before_body});
      - the network producer is wrapped in a L{_ReadGate} so that the body's
        flow control and Twisted's own pausing do not undo each other;
      - the idle timeout does not fire while reading is paused because the
        handler has not read the body yet, nor while the client waits for
        C{100 Continue}: the client is not idle then, the server is.

    HTTP/2 is not offered: Twisted's HTTP/2 channel buffers bodies its own
    way.

    @cvar drain_limit: A body whose unread rest is at most this many bytes
        when an early response starts is drained so the connection can be
        reused; after a C{Connection: close} response, at most this many
        more bytes are read (and dropped) before closing.
    @cvar linger_timeout: Seconds a connection stays open after a
        C{Connection: close} response sent before the body was read,
        dropping what the client still sends, so that a client that sends
        its whole body before reading gets to read the response instead of a
        connection reset.

    @ivar body_reading: What request bodies pause and resume (set when the
        connection is made).
    """

    drain_limit = 8 * MiB
    linger_timeout = 5.0

    def __init__(self) -> None:
        super().__init__()
        self._headers_too_large = False
        self._draining: AnvilRequest | None = None
        self._drained = 0
        self._linger: IDelayedCall | None = None
        self._ignore_input = False
        self._host: Any = None

    def getHost(self) -> Any:
        """
        The connection's local address, asked of the kernel once.

        Every request asks for it (L{Request.__init__}), and a TCP
        transport makes a C{getsockname} system call each time.

        @return: An L{IAddress} provider.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionMade(self) -> None:
        """
        Start the connection, putting a L{_ReadGate} between Twisted's
        channel code and the transport.
        """
        super().connectionMade()
        self._gate = _ReadGate(self._networkProducer)
        self._networkProducer = self._gate  # type: ignore[assignment]
        self.body_reading = _BodyReading(self._gate)

    def dataReceived(self, data: bytes) -> None:
        """
        Parse bytes from the client, unless the connection is closing after
        an early response (then they belong to a body nobody reads).

        @param data: The bytes.
        """
        if self._ignore_input:
            return
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        """
        The headers are complete: prepare the body and, if there is one,
        dispatch the request now.

        This replaces L{HTTPChannel.allHeadersReceived}, whose only other
        job is to send C{100 Continue} at once; here it is sent when the
        resource first reads the body.
        """
        request = self.requests[-1]
        request.parseCookies()
        self.persistent = self.checkPersistence(request, self._version)
        expect = request.requestHeaders.getRawHeaders(b"Expect")
        wants_continue = bool(
            expect and expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1"
        )
        if self.length == 0:
            if wants_continue:
                # Nothing to wait for, but botocore (the AWS CLI's empty
                # files) mishandles the next request on a connection whose
                # Expect was answered by a final status directly; S3 sends
                # the interim response, so do we.
                self._send_continue()
            # No body: HTTPChannel calls allContentReceived right after this
            # returns, which dispatches the request exactly as Twisted does.
            request.gotLength(0)
            return
        send_continue = self._send_continue if wants_continue else None
        request.gotLength(self.length, send_continue)
        request.dispatch_early(self._command, self._path, self._version)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Write a response's status line and headers, with C{x-amz-*} names in
        lower case.

        Twisted capitalises header names (C{X-Amz-Meta-Colour}). S3 sends
        its own headers in lower case, and SDKs derive user-metadata keys
        from the names as sent, so capitalised names would change the keys
        a client gets back (boto3 would return C{"Colour"} for C{"colour"}).

        @param version: The HTTP version.
        @param code: The status code, as bytes.
        @param reason: The reason phrase.
        @param headers: The response headers (L{Headers}; anything else is
            left to Twisted).
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        lines = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            if name[:6].lower() == b"x-amz-":
                name = name.lower()
            for value in values:
                lines.extend((name, b": ", value, b"\r\n"))
        lines.append(b"\r\n")
        self.transport.writeSequence(lines)

    def _send_continue(self) -> None:
        """
        Send the C{100 Continue} interim response.
        """
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def rawDataReceived(self, data: bytes) -> None:
        """
        Receive body (or pipelined) bytes, and bound how much of a body is
        read after a C{Connection: close} early response.

        @param data: The bytes.
        """
        if self._draining is not None and not self.persistent:
            self._drained += len(data)
            if self._drained > self.drain_limit:
                self._stop_draining()
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """
        A body has fully arrived: end it, and if its response was already
        sent, let the connection move on to the next request (or close).
        """
        request = self.requests[-1]
        super().allContentReceived()
        if request is self._draining:
            self._stop_draining()

    def requestDone(self, request: Any) -> None:
        """
        A response is finished. Move on to the next request if the body has
        fully arrived; otherwise drain the body first, or linger and close.

        @param request: The finished request (the first in the queue).
        """
        body = getattr(request, "body", None)
        if body is None or body.ended:
            if body is not None:
                # Unread buffered pieces are of no use any more.
                body.discard()
            super().requestDone(request)
            return
        # Drop the rest as it arrives, and read at full speed again.
        body.discard()
        self._draining = request
        self._drained = 0
        if not self.persistent:
            self._linger = self.callLater(self.linger_timeout, self._stop_draining)
        # Otherwise the rest is short (see AnvilRequest._answering_before_body);
        # allContentReceived moves on when it has arrived, and the idle
        # timeout closes the connection if it never does.

    def _stop_draining(self) -> None:
        """
        End the drain or linger after an early response: the body has
        arrived, or enough was dropped, or time is up.
        """
        request, self._draining = self._draining, None
        if self._linger is not None:
            if self._linger.active():
                self._linger.cancel()
            self._linger = None
        if request is None:
            return
        if not self.persistent:
            # Whatever else arrives is the rest of an unread body.
            self._ignore_input = True
        # Moves on to the next request, or closes the connection when it is
        # not persistent.
        super().requestDone(request)

    def timeoutConnection(self) -> None:
        """
        Time out an idle connection, but not one that is quiet because the
        server is behind: reading is paused because the handler has not
        read the body yet, or the client waits for a C{100 Continue} the
        handler has not asked for yet.
        """
        if self._gate.held_by(_BODY) or self._awaiting_continue():
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def _awaiting_continue(self) -> bool:
        """
        Whether the request being handled waits for C{100 Continue}.
        """
        if not self.requests or self._draining is not None:
            return False
        body = getattr(self.requests[-1], "body", None)
        return body is not None and body.continue_pending

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The connection closed: stop lingering, fail bodies in progress.

        @param reason: Why.
        """
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self._draining = None
        super().connectionLost(reason)

    def lineReceived(self, line: bytes) -> Any:
        """
        Note when the request line and headers outgrow C{totalHeadersSize},
        so the refusal can say so (see L{_respondToBadRequestAndDisconnect}).

        @param line: A request or header line.
        """
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._headers_too_large = True
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request or header line longer than C{MAX_LENGTH}: refuse it as an
        oversized header section (Twisted would just drop the connection).

        @param line: What was received of the line.
        """
        self._headers_too_large = True
        self._respondToBadRequestAndDisconnect()

    def headerReceived(self, line: bytes) -> bool:
        """
        Note when a request has more than C{maxHeaders} headers.

        @param line: One header line.
        """
        if self._receivedHeaderCount + 1 > self.maxHeaders:
            self._headers_too_large = True
        return bool(super().headerReceived(line))

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Refuse a malformed request.  Twisted answers a bare C{400}; S3
        clients expect an XML error document, and for an oversized header
        section AWS's code is C{RequestHeaderSectionTooLarge}.
        """
        if not self._headers_too_large:
            super()._respondToBadRequestAndDisconnect()
            return
        # Imported here: the web layer does not otherwise depend on S3.
        from anvil.s3.errors import RequestHeaderSectionTooLarge

        request_id = new_request_id()
        body = RequestHeaderSectionTooLarge().to_xml("", request_id)
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\n"
            b"Content-Type: application/xml\r\n"
            + b"Content-Length: %d\r\n" % len(body)
            + b"x-amz-request-id: " + request_id.encode("ascii") + b"\r\n"
            b"Connection: close\r\n\r\n"
            + body
        )
        self.loseConnection()


class AnvilSite(Site):
    """
    The site of the API listener: Twisted's L{Site} with L{AnvilRequest}s,
    metrics and an access log through L{twisted.logger}.

    Its connections are L{AnvilChannel}s: requests are dispatched when their
    headers are complete and read their bodies through C{request.body}.
    Form bodies are never parsed into C{request.args}: S3 bodies are object
    data.

    @ivar metrics: Where request metrics are recorded.
    """

    requestFactory = AnvilRequest
    protocol = AnvilChannel  # type: ignore[assignment]
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
        client = getattr(request.getClientAddress(), "host", "-")
        method = request.method.decode("ascii", "replace")
        duration_ms = seconds * 1000
        api = request.anvil_api
        operation = request.anvil_operation
        emit = self._log.debug if api == API_NODE else self._log.info
        # The line is formatted here, once, with an f-string: a format
        # string of nine fields costs more to render through
        # twisted.logger's formatter than the rest of a small GET's logging.
        # The fields stay in the event for JSON output and observers.
        emit(
            "{access_line}",
            access_line=f"{client} {method} {path} {status} {duration_ms:.1f}ms "
            f"request_id={request.request_id} {api}:{operation}",
            client=client,
            method=method,
            path=path,
            status=status,
            duration_ms=duration_ms,
            request_id=request.request_id,
            api=api,
            operation=operation,
        )

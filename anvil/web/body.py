# -*- test-case-name: tests.test_web_body -*-
"""
Request bodies that stream in while the request is being handled.

twisted.web hands a request to its resource only once the whole body has
arrived, buffered in C{request.content} (a temporary file above 100 KB).
Anvil dispatches requests when their headers are complete instead (see
L{anvil.web.server.AnvilChannel}); the body then arrives through a
L{RequestBody}, which the handler reads piece by piece while the client is
still sending.

Memory stays bounded whatever the client does: once more than
L{RequestBody.high_water} bytes are buffered and unread, reading from the
connection is paused, and it resumes when the handler has read the buffer
down below L{RequestBody.low_water}. TCP flow control then slows the
client to the handler's pace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer

from anvil.errors import AnvilError

MiB = 1024 * 1024

_JOIN_SMALLER_THAN = 64 * 1024
"""
Pieces shorter than this are joined with the small pieces that follow them
into one L{RequestBody.read} result. A socket read delivers up to 64 KiB;
smaller pieces (TLS records, small chunks of a chunked body) would
otherwise cost one read call each.
"""

_JOIN_UP_TO = 256 * 1024
"""The most bytes one L{RequestBody.read} result is joined up to."""


class BodyIncomplete(AnvilError):
    """
    The request body ended before all of it arrived: the client hung up
    part-way (or sent fewer bytes than its C{Content-Length} and then hung
    up), or the handler discarded the body and then tried to read it.

    Nothing derived from a body that raised this may be stored.

    @ivar received: How many body bytes had arrived.
    @ivar expected: The C{Content-Length}, or C{None} for a chunked body.
    """

    def __init__(self, message: str, received: int, expected: int | None) -> None:
        """
        @param message: One sentence describing what happened.
        @param received: How many body bytes had arrived.
        @param expected: The announced length, or C{None}.
        """
        super().__init__(message)
        self.received = received
        self.expected = expected


class RequestBody:
    """
    The body of one request, as it arrives.

    The handler side uses L{read} (or L{discard}); the HTTP side
    (L{anvil.web.server.AnvilRequest}) calls L{data_received},
    L{end_received} and L{connection_lost}.

    Only one L{read} may be outstanding at a time: a body is a single
    stream with a single consumer.

    @cvar high_water: When more unread bytes than this are buffered, reading
        from the connection is paused.
    @cvar low_water: Reading resumes when the handler has read the buffer
        down below this many bytes.

    @ivar content_length: The length announced in C{Content-Length}; C{0}
        for a request without a body (no C{Content-Length} and no
        C{Transfer-Encoding}); C{None} for a C{Transfer-Encoding: chunked}
        body, whose length is known only at its end.
    @ivar bytes_received: How many body bytes (after removing any HTTP
        chunked framing) have arrived from the client so far, whether read
        yet or not.
    """

    high_water = 4 * MiB
    low_water = 1 * MiB

    def __init__(
        self,
        content_length: int | None,
        reading: IPushProducer | None = None,
        send_continue: Callable[[], None] | None = None,
    ) -> None:
        """
        @param content_length: The announced length (see
            L{content_length}).
        @param reading: Paused and resumed to stop and restart reading the
            body from the connection; C{None} for no flow control (a body
            that is already complete when it is created).
        @param send_continue: For a request with C{Expect: 100-continue},
            sends the C{100 Continue} interim response. It is called on the
            first L{read}, so a request the handler rejects without reading
            its body never makes the client send that body.
        """
        self.content_length = content_length
        self.bytes_received = 0
        self._reading = reading
        self._send_continue = send_continue
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._ended = False
        self._discarded = False
        self._failure: BodyIncomplete | None = None
        self._waiter: Deferred[bytes] | None = None

    # Handler side.

    @property
    def ended(self) -> bool:
        """
        Whether the whole body has arrived from the client (it may still be
        buffered, unread). Once true, L{read} never raises
        L{BodyIncomplete}, even if the connection is lost afterwards.
        """
        return self._ended

    @property
    def buffered(self) -> int:
        """
        How many bytes have arrived but have not been read yet.
        """
        return self._buffered

    @property
    def continue_pending(self) -> bool:
        """
        Whether the client asked for C{100 Continue}, has not been sent it,
        and has not started sending the body anyway: such a client may never
        send the body, so the connection cannot be reused after a response
        that did not read it.
        """
        return self._send_continue is not None

    async def read(self) -> bytes:
        """
        Wait for and return the next piece of the body.

        Pieces are returned as they arrived (several small ones may be
        joined); their size is not fixed.

        @return: The next piece, never empty before the end; C{b""} at the
            end of the body, and again for every later call (as a file's
            C{read} does).
        @raise BodyIncomplete: The connection was lost before the end of the
            body, or L{discard} was called.
        @raise RuntimeError: Another L{read} is still waiting.
        """
        if self._discarded:
            # Even if the rest had arrived: what was dropped is gone, so a
            # b"" here would pass a truncated body off as complete.
            raise BodyIncomplete(
                "The request body was discarded before it was read.",
                self.bytes_received,
                self.content_length,
            )
        if self._pieces:
            return self._take()
        if self._ended:
            return b""
        if self._failure is not None:
            raise self._failure
        if self._waiter is not None:
            raise RuntimeError("RequestBody.read() called while another read is waiting")
        if self._send_continue is not None:
            send, self._send_continue = self._send_continue, None
            send()

        def cancel(waiter: Deferred[bytes]) -> None:
            # The handler gave up waiting (its work was cancelled): forget
            # the waiter so arriving data is buffered instead of delivered
            # to a Deferred that has already failed.
            self._waiter = None

        waiter: Deferred[bytes] = Deferred(cancel)
        self._waiter = waiter
        return await waiter

    def discard(self) -> None:
        """
        Drop whatever is buffered and everything that arrives later, without
        buffering it; reading from the connection continues at full speed.

        Call this when the body will not be read (an error answered before
        the body). The HTTP layer calls it too when a response is finished
        before its body was read. Later L{read}s raise L{BodyIncomplete}.
        """
        if self._discarded:
            return
        self._discarded = True
        self._pieces.clear()
        self._buffered = 0
        self._resume()
        self._fail_waiter(
            BodyIncomplete(
                "The request body was discarded before it was read.",
                self.bytes_received,
                self.content_length,
            )
        )

    # HTTP side.

    def data_received(self, data: bytes) -> None:
        """
        Accept the next piece of the body from the connection.

        @param data: Body bytes, with any chunked framing already removed.
        """
        if not data:
            return
        self.bytes_received += len(data)
        # The client did not wait for "100 Continue" (clients give up
        # waiting after a while); sending it now would only be noise.
        self._send_continue = None
        if self._discarded or self._failure is not None:
            return
        if self._waiter is not None:
            # The buffer is empty whenever someone waits.
            waiter, self._waiter = self._waiter, None
            waiter.callback(data)
            return
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > self.high_water and not self._paused:
            self._paused = True
            if self._reading is not None:
                self._reading.pauseProducing()

    def end_received(self) -> None:
        """
        The whole body has arrived.
        """
        if self._ended:
            return
        self._ended = True
        self._send_continue = None
        # No more body will come: what follows on the connection is the next
        # request, which the channel buffers (and throttles) itself.
        self._resume()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(b"")

    def connection_lost(self) -> None:
        """
        The connection closed. A body that had not fully arrived fails: the
        waiting L{read} and all later ones raise L{BodyIncomplete}.
        """
        self._send_continue = None
        self._reading = None
        if self._ended or self._failure is not None:
            return
        if self.content_length is None:
            message = (
                f"The client closed the connection after {self.bytes_received} "
                "bytes of a chunked request body, before its last chunk."
            )
        else:
            message = (
                f"The client closed the connection after {self.bytes_received} "
                f"of {self.content_length} request body bytes."
            )
        self._failure = BodyIncomplete(message, self.bytes_received, self.content_length)
        self._pieces.clear()
        self._buffered = 0
        self._fail_waiter(self._failure)

    # Internals.

    def _take(self) -> bytes:
        """
        Remove and return the next piece from the buffer, joining it with
        following pieces if they are all small.
        """
        piece = self._pieces.popleft()
        if len(piece) < _JOIN_SMALLER_THAN and self._pieces:
            parts = [piece]
            size = len(piece)
            while (
                self._pieces
                and len(self._pieces[0]) < _JOIN_SMALLER_THAN
                and size + len(self._pieces[0]) <= _JOIN_UP_TO
            ):
                following = self._pieces.popleft()
                parts.append(following)
                size += len(following)
            piece = b"".join(parts)
        self._buffered -= len(piece)
        if self._paused and self._buffered < self.low_water:
            self._resume()
        return piece

    def _resume(self) -> None:
        """
        Resume reading from the connection if this body paused it.
        """
        if self._paused:
            self._paused = False
            if self._reading is not None:
                self._reading.resumeProducing()

    def _fail_waiter(self, failure: BodyIncomplete) -> None:
        """
        Make the waiting L{read}, if any, raise C{failure}.
        """
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(failure)

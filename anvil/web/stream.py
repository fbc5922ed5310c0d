# -*- test-case-name: tests.test_web_stream -*-
"""
Streaming a response body from an async iterator, at the client's pace.

L{stream_response} registers a push producer on the request: when the
connection's send buffer is full, Twisted pauses it and it stops pulling
chunks from the iterator until Twisted resumes it. At most one chunk beyond
the transport's send buffer is therefore in memory, however large the
response and however slow the client.

When the client goes away the iterator is stopped (the chunk being produced
is cancelled and the iterator closed with C{aclose()}), so the storage work
behind a download ends with the download.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from anvil.errors import AnvilError


class ClientDisconnected(AnvilError):
    """
    The client closed the connection before the whole response was sent.
    """

    def __init__(self, message: str = "The client closed the connection during the response.") -> None:
        """
        @param message: One sentence describing what happened.
        """
        super().__init__(message)


_END = object()
"""What L{_next} returns when the iterator is exhausted."""


async def _next(chunks: AsyncIterator[bytes]) -> object:
    """
    Get the next chunk, as a coroutine that can run inside a cancellable
    L{Deferred}.

    @param chunks: The iterator.
    @return: The next chunk, or L{_END}.
    """
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return _END


@implementer(IPushProducer)
class _Streamer:
    """
    The producer behind one L{stream_response} call.
    """

    _log = Logger()

    def __init__(self, request: Any, chunks: AsyncIterator[bytes]) -> None:
        """
        @param request: The request to respond to.
        @param chunks: The body.
        """
        self._request = request
        self._chunks = chunks
        self._paused = False
        self._gone = False
        self._resumed: Deferred[None] | None = None
        self._pulling: Deferred[object] | None = None

    # IPushProducer, called by the channel.

    def pauseProducing(self) -> None:
        """
        The send buffer is full: stop pulling chunks.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        The send buffer has drained: pull chunks again.
        """
        self._paused = False
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self._lost()

    def _lost(self, reason: Failure | None = None) -> None:
        """
        Stop streaming because the client is gone: wake the loop from
        whatever it waits for.

        @param reason: Why (ignored: any loss ends the stream the same way).
        """
        if self._gone:
            return
        self._gone = True
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.errback(ClientDisconnected())
        if self._pulling is not None:
            # Stops the iterator's current step where it waits (a disk read,
            # a decode): CancelledError is raised inside it.
            self._pulling.cancel()

    async def run(self) -> None:
        """
        Write every chunk, honouring pauses, then finish the request.
        """
        request = self._request
        if request.method == b"HEAD":
            # Twisted discards HEAD bodies: producing one would be all cost.
            await self._close_iterator()
            request.finish()
            return
        if getattr(request, "channel", None) is None:
            # Already disconnected (Request.connectionLost drops the
            # channel): notifyFinish would never fire now.
            await self._close_iterator()
            raise ClientDisconnected()
        request.notifyFinish().addErrback(self._lost)
        request.registerProducer(self, True)
        try:
            await self._pump()
        except BaseException:
            self._unregister()
            await self._close_iterator()
            raise
        self._unregister()
        request.finish()

    async def _pump(self) -> None:
        """
        Pull and write chunks until the iterator ends.

        @raise ClientDisconnected: The client went away.
        """
        request = self._request
        while True:
            if self._paused and not self._gone:
                resumed: Deferred[None] = Deferred()
                self._resumed = resumed
                try:
                    await resumed
                finally:
                    # Also when cancelled: a later resumeProducing must not
                    # fire a Deferred that has already failed.
                    self._resumed = None
            if self._gone:
                raise ClientDisconnected()
            self._pulling = Deferred.fromCoroutine(_next(self._chunks))
            try:
                chunk = await self._pulling
            except CancelledError:
                if self._gone:
                    raise ClientDisconnected() from None
                raise
            except BaseException:
                if self._gone:
                    # The iterator failed because it was interrupted.
                    raise ClientDisconnected() from None
                if request.startedWriting:
                    self._abort()
                raise
            finally:
                self._pulling = None
            if self._gone:
                raise ClientDisconnected()
            if chunk is _END:
                return
            assert isinstance(chunk, bytes), f"response chunks must be bytes, not {type(chunk)!r}"
            if chunk:
                request.write(chunk)

    def _abort(self) -> None:
        """
        The body failed after part of it was sent: the headers promised
        more, so the only honest signal left is to cut the connection (the
        client sees a short body). The request is recorded as a server
        error.
        """
        self._request.setResponseCode(500)
        channel = self._request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def _unregister(self) -> None:
        """
        Unregister the producer unless the connection is already gone (its
        channel then no longer exists).
        """
        request = self._request
        if request.producer is self and request.channel is not None:
            request.unregisterProducer()

    async def _close_iterator(self) -> None:
        """
        Close the iterator so the work behind it stops and releases what it
        holds; failures while closing are logged, not raised.
        """
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing is cleanup: log, never mask the real outcome
            self._log.failure("Closing a response body iterator failed")


async def stream_response(request: Any, chunks: AsyncIterator[bytes]) -> None:
    """
    Send C{chunks} as the response body, pulling the next chunk only while
    the client keeps up, and finish the request at the end.

    The caller sets the status and headers first (normally a
    C{Content-Length}; without one Twisted sends the body chunked). Nothing
    is written until the first chunk is ready, so if the iterator fails at
    once, the request is untouched and the caller can still send an error
    response. For a C{HEAD} request the iterator is closed without being
    read and the request is finished.

    @param request: An L{anvil.web.server.AnvilRequest} (any
        L{twisted.web.server.Request} works).
    @param chunks: The body, as an async iterator of L{bytes}. It is always
        closed (C{aclose()}, when it has one) if it does not run to its end.
    @raise ClientDisconnected: The client went away first; the iterator was
        stopped and closed, and the request is left alone (it cannot be
        finished any more).
    @raise Exception: Whatever the iterator raised. If part of the body had
        already been written, the connection has been aborted and the
        request's status set to 500 for the metrics; otherwise nothing was
        written and the request is still open.
    """
    await _Streamer(request, chunks).run()

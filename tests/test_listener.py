# -*- test-case-name: tests.test_listener -*-
"""
Tests for L{anvil.web.listener}: the API listener drains on shutdown.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from anvil.web.listener import DrainingListener, track_channels


class _FakePort:
    """
    A listening port that records whether it was stopped.
    """

    stopped = False

    def stopListening(self):
        self.stopped = True
        return succeed(None)


class _Slow(Resource):
    """
    A resource whose responses finish only when the test says so.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending = []

    def render_GET(self, request):
        self.pending.append(request)
        return NOT_DONE_YET


class DrainingListenerTests(SynchronousTestCase):
    """
    Stopping the listener stops accepting, closes idle connections, waits for
    busy ones up to the timeout and aborts the rest.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = _Slow()
        self.site = Site(self.resource)
        self.channels = track_channels(self.site)
        self.port = _FakePort()
        self.listener = DrainingListener(self.port, self.channels, self.clock, 10.0)
        self.listener.startService()

    def connect(self):
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_idle_connections_closed_at_once(self) -> None:
        """
        Idle keep-alive connections are closed and stopping completes without
        waiting for the timeout.
        """
        protocol, transport = self.connect()
        d = self.listener.stopService()
        self.assertTrue(self.port.stopped)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.clock.advance(0.05)
        self.successResultOf(d)

    def test_busy_connection_finishes(self) -> None:
        """
        A request in flight is allowed to finish; the connection is closed
        after its response and stopping then completes.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(self.resource.pending), 1)
        d = self.listener.stopService()
        self.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(d)
        request = self.resource.pending[0]
        request.write(b"done")
        request.finish()
        self.clock.advance(0.05)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"done", transport.value())
        protocol.connectionLost(None)
        self.clock.advance(0.05)
        self.successResultOf(d)

    def test_stuck_connection_aborted_after_timeout(self) -> None:
        """
        A request still running after the drain timeout has its connection
        aborted, and stopping completes.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        d = self.listener.stopService()
        self.clock.advance(9.9)
        self.assertNoResult(d)
        aborted = []

        def abort_then_lose() -> None:
            aborted.append(True)
            protocol.connectionLost(None)

        transport.abortConnection = abort_then_lose  # type: ignore[method-assign]
        self.clock.advance(0.2)
        self.assertEqual(aborted, [True])
        self.successResultOf(d)

    def test_closed_connections_forgotten(self) -> None:
        """
        Connections that close on their own are no longer tracked.
        """
        protocol, _ = self.connect()
        self.assertEqual(len(self.channels), 1)
        protocol.connectionLost(None)
        self.assertEqual(len(self.channels), 0)

"""write_now and close_now on real loopback TCP connections: bytes arrive
complete and in order, whether sent at once or left to the reactor (data
already buffered, a transport that is not plain TCP), and a connection closed
at once ends cleanly."""

from __future__ import annotations

import socket

from twisted.internet import defer, error, protocol, reactor, tcp
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.sendnow import close_now, write_now


class Collect(protocol.Protocol):
    def __init__(self, expected: int):
        self.expected = expected
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(self.data)


class Writer(protocol.Protocol):
    """Writes its script on connect; records whether write_now left the bytes to the reactor."""

    def __init__(self, script, sndbuf: int | None = None):
        self.script = script
        self.sndbuf = sndbuf
        self.buffered_after: list[int] = []

    def connectionMade(self):
        if self.sndbuf:
            # A small send buffer, so that the kernel refuses part of a big
            # write on any machine (not only where the defaults are small).
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        for how, data in self.script:
            if how == "now":
                write_now(self.transport, data)
            else:
                self.transport.write(data)
            self.buffered_after.append(self.transport._tempDataLen)


class WriteNowTests(unittest.TestCase):

    @defer.inlineCallbacks
    def _exchange(self, script, sndbuf: int | None = None):
        expected = sum(len(d) for _, d in script)
        receiver = Collect(expected)
        writer = Writer(script, sndbuf)
        server = protocol.ServerFactory.forProtocol(lambda: writer)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        factory = protocol.ClientFactory.forProtocol(lambda: receiver)
        factory.clientConnectionFailed = lambda c, reason: receiver.done.errback(reason)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        self.addCleanup(connector.disconnect)
        data = yield receiver.done
        return writer, data

    @defer.inlineCallbacks
    def test_sent_at_once_when_nothing_is_buffered(self):
        writer, data = yield self._exchange([("now", b"220 hello\r\n"), ("now", b"250 ok\r\n")])
        self.assertEqual(data, b"220 hello\r\n250 ok\r\n")
        self.assertEqual(writer.buffered_after, [0, 0])     # nothing was left to the reactor
        self.assertIsInstance(writer.transport, tcp.Server)
        # The Twisted internals write_now reads (Twisted is pinned; an upgrade that
        # renames them must fail here, not silently fall back or break).
        for name in ("TLS", "connected", "disconnecting", "_aborting", "_tempDataLen", "dataBuffer",
                     "offset", "socket", "_shouldShutdown"):
            self.assertTrue(hasattr(writer.transport, name), name)

    @defer.inlineCallbacks
    def test_nothing_is_sent_after_an_abort(self):
        class Aborter(Writer):
            def connectionMade(self):
                write_now(self.transport, b"first\r\n")
                self.transport.abortConnection()
                write_now(self.transport, b"never\r\n")
        receiver = Collect(10 ** 6)
        server = protocol.ServerFactory.forProtocol(lambda: Aborter([]))
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        lost = defer.Deferred()
        receiver.connectionLost = lambda reason: lost.callback(None)
        reactor.connectTCP("127.0.0.1", port.getHost().port,
                           protocol.ClientFactory.forProtocol(lambda: receiver))
        yield lost
        self.assertNotIn(b"never", receiver.data)

    @defer.inlineCallbacks
    def test_order_is_kept_behind_buffered_data(self):
        big = b"x" * (4 * 1024 * 1024)     # far more than a 64 KiB send buffer takes at once
        writer, data = yield self._exchange([("now", big), ("now", b"after\r\n"), ("write", b"last\r\n")],
                                            sndbuf=64 * 1024)
        self.assertEqual(len(data), len(big) + 13)
        self.assertTrue(data.endswith(b"after\r\nlast\r\n"))
        self.assertGreater(writer.buffered_after[0], 0)     # the kernel took only part of ``big``
        self.assertGreater(writer.buffered_after[1], 0)     # queued behind the rest of ``big``

    @defer.inlineCallbacks
    def _close_after(self, script, sndbuf: int | None = None):
        """The writer runs its script, then close_now: what the peer received
        before the connection ended, and the writer's protocol."""
        class Closer(Writer):
            lost_before_return = None

            def connectionMade(self):
                Writer.connectionMade(self)
                self.lost = False
                close_now(self.transport)
                self.lost_before_return = self.lost

            def connectionLost(self, reason):
                self.lost = reason

        receiver = Collect(10 ** 9)
        writer = Closer(script, sndbuf)
        port = reactor.listenTCP(0, protocol.ServerFactory.forProtocol(lambda: writer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ended = defer.Deferred()
        receiver.connectionLost = lambda reason: ended.callback(reason.value)
        reactor.connectTCP("127.0.0.1", port.getHost().port,
                           protocol.ClientFactory.forProtocol(lambda: receiver))
        reason = yield ended
        return receiver.data, reason, writer

    @defer.inlineCallbacks
    def test_close_now_closes_at_once_when_nothing_is_buffered(self):
        data, reason, writer = yield self._close_after([("now", b"221 bye\r\n")])
        self.assertEqual(data, b"221 bye\r\n")
        self.assertIsInstance(reason, error.ConnectionDone)     # a FIN, not a reset
        self.assertIsNot(writer.lost_before_return, False)  # connectionLost ran within close_now
        writer.lost_before_return.trap(error.ConnectionDone)
        self.assertNotIn(writer.transport, reactor.getReaders() + reactor.getWriters())
        self.assertFalse(hasattr(writer.transport, "socket"))   # Twisted closed and dropped it

    @defer.inlineCallbacks
    def test_close_now_sends_what_is_buffered_first(self):
        big = b"x" * (4 * 1024 * 1024)
        data, reason, writer = yield self._close_after([("now", big), ("write", b"221 bye\r\n")],
                                                      sndbuf=64 * 1024)
        self.assertEqual(len(data), len(big) + 9)
        self.assertTrue(data.endswith(b"221 bye\r\n"))
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertFalse(writer.lost_before_return)         # left to loseConnection: closed later

    def test_close_now_on_other_transports_loses_the_connection(self):
        transport = StringTransport()
        close_now(transport)
        self.assertTrue(transport.disconnecting)

    def test_other_transports_get_an_ordinary_write(self):
        transport = StringTransport()
        write_now(transport, b"250 ok\r\n")
        self.assertEqual(transport.value(), b"250 ok\r\n")

"""``write_now``: send on a TCP transport at once instead of at the next reactor turn.

Twisted's ``transport.write`` only buffers: the bytes leave at the next turn
of the reactor, after an ``epoll_ctl`` to watch for writability, the
``epoll_wait`` that reports it, and another ``epoll_ctl`` to stop watching.
An SMTP reply or command is a few dozen bytes that the kernel always takes at
once, so for each of them relay pays three system calls and a reactor turn,
and the peer waits that turn.  ``write_now`` sends directly when nothing is
buffered (as asyncio's transports do) and falls back to ``transport.write``
for everything else: a TLS connection, data already waiting, a partial send,
an error (which the reactor then reports as usual), or a transport that is
not a plain TCP connection (tests' StringTransport).

It reads Twisted's own write buffer (``dataBuffer``, ``offset``,
``_tempDataLen`` of ``twisted.internet.abstract.FileDescriptor``); Twisted is
pinned, and tests/integration/test_sendnow.py checks those attributes still exist.

``close_now`` does the same for ``transport.loseConnection()``: with nothing
buffered it closes at once (one ``epoll_ctl`` and ``close``) instead of
watching for writability, waiting a reactor turn and calling ``shutdown``
before ``close``.
"""

from __future__ import annotations

from twisted.internet import main, tcp
from twisted.python.failure import Failure

_PLAIN_TCP = (tcp.Server, tcp.Client)


def _nothing_buffered(transport) -> bool:
    """A connected plain TCP transport with an empty write buffer."""
    return (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._aborting and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer))


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when the transport can take it."""
    if _nothing_buffered(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0        # EAGAIN, or an error the reactor will report on its next turn
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def close_now(transport) -> None:
    """``transport.loseConnection()``, closed at once when nothing is left to send.

    The protocol's ``connectionLost`` runs before this returns, as it does
    when Twisted closes a connection whose writing side is already shut.
    The socket is closed without ``shutdown`` (Twisted's own comment calls it
    unnecessary: the descriptor is close-on-exec, so this process holds the
    only copy); ``close`` sends the FIN.
    """
    if not _nothing_buffered(transport):
        transport.loseConnection()
        return
    transport.disconnecting = True      # as loseConnection does: readers of this transport stop
    transport._shouldShutdown = False
    transport.connectionLost(Failure(main.CONNECTION_DONE))

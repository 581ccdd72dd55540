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
"""

from __future__ import annotations

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when the transport can take it."""
    if (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._aborting and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0        # EAGAIN, or an error the reactor will report on its next turn
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)

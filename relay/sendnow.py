"""``write_now``: send on a TCP transport without Twisted's write-watch.

Twisted's ``transport.write`` only buffers: the bytes leave at the next turn
of the reactor, after an ``epoll_ctl`` to watch for writability, the
``epoll_wait`` that reports it, and another ``epoll_ctl`` to stop watching.
An SMTP reply or command is a few dozen bytes that the kernel always takes at
once, so for each of them relay would pay three system calls and a reactor
turn.  ``write_now`` avoids that when nothing is buffered (as asyncio's
transports do):

- on relayd's reactor (``relay.reactor``, which carries an ``OutputBatch``)
  the bytes are sent when the reactor has handled the events of the current
  turn: one ``send`` per connection per turn, and the peers (8 SMTP clients
  served by one process, say) are woken together instead of one at a time;
- on any other reactor (tests, ``twistd``) they are sent at once.

It falls back to Twisted's buffer for everything else: a TLS connection,
data already waiting there, the rest of a partial send, an error (which the
reactor then reports as usual), or a transport that is not a plain TCP
connection (tests' StringTransport).  Bytes always leave in the order they
were written.

``close_now`` does the same for ``transport.loseConnection()``: with nothing
buffered it sends what is batched and closes at once (one ``epoll_ctl`` and
``close``) instead of watching for writability, waiting a reactor turn and
calling ``shutdown`` before ``close``.

It reads and writes Twisted's own write buffer (``dataBuffer``, ``offset``,
``_tempDataLen`` of ``twisted.internet.abstract.FileDescriptor``); Twisted is
pinned, and tests/integration/test_sendnow.py checks those attributes still exist.
"""

from __future__ import annotations

from twisted.internet import abstract, main, tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

_PLAIN_TCP = (tcp.Server, tcp.Client)


def _twisted_buffer_empty(transport) -> bool:
    return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)


def _nothing_buffered(transport) -> bool:
    """A connected plain TCP transport with an empty write buffer."""
    return (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._aborting and _twisted_buffer_empty(transport))


def _send(transport, data: bytes) -> None:
    """Send ``data`` ahead of anything in Twisted's buffer; what the kernel
    does not take goes to the front of that buffer, as it is (``data`` was
    written before any STARTTLS, so it never goes through TLS)."""
    try:
        sent = transport.socket.send(data)
    except OSError:
        sent = 0        # EAGAIN, or an error the reactor will report on its next turn
    if sent == len(data):
        return
    rest = data[sent:]
    if _twisted_buffer_empty(transport):
        abstract.FileDescriptor.write(transport, rest)      # not TLS's write, if TLS started since
        return
    # Written after ``data`` was: keep it behind the rest.
    transport.dataBuffer = rest + transport.dataBuffer[transport.offset:]
    transport.offset = 0
    transport.startWriting()


class OutputBatch:
    """Bytes written with ``write_now`` during one reactor turn, by transport,
    sent by ``flush`` (which relay's reactor calls at the end of each turn)."""

    def __init__(self):
        self.pending: dict = {}

    def write(self, transport, data: bytes) -> None:
        chunks = self.pending.get(transport)
        if chunks is None:
            if _nothing_buffered(transport):
                self.pending[transport] = [data]
            else:
                transport.write(data)
        elif _twisted_buffer_empty(transport) and not transport.TLS:
            chunks.append(data)
        else:
            transport.write(data)       # behind what other code wrote since, or through TLS

    def flush(self) -> None:
        """Send everything batched (a transport closed or aborted meanwhile
        gets nothing; one that fails does not keep the others' bytes back)."""
        while self.pending:
            pending, self.pending = self.pending, {}
            for transport, chunks in pending.items():
                try:
                    self._send(transport, chunks)
                except Exception:  # noqa: BLE001 - log it, send the others' replies
                    log.failure("sending to {transport!r} failed", transport=transport)

    def flush_one(self, transport) -> None:
        chunks = self.pending.pop(transport, None)
        if chunks is not None:
            self._send(transport, chunks)

    @staticmethod
    def _send(transport, chunks: list[bytes]) -> None:
        if transport.connected and not transport._aborting:
            _send(transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at the end of this reactor turn on
    relayd's reactor and at once on others, when the transport can take it."""
    batch = getattr(getattr(transport, "reactor", None), "output_batch", None)
    if batch is not None:
        batch.write(transport, data)
    elif _nothing_buffered(transport):
        _send(transport, data)
    else:
        transport.write(data)


def flush_now(transport) -> None:
    """Send what ``write_now`` batched for ``transport`` now (before STARTTLS)."""
    batch = getattr(getattr(transport, "reactor", None), "output_batch", None)
    if batch is not None:
        batch.flush_one(transport)


def close_now(transport) -> None:
    """``transport.loseConnection()``, closed at once when nothing is left to send.

    The protocol's ``connectionLost`` runs before this returns, as it does
    when Twisted closes a connection whose writing side is already shut.
    The socket is closed without ``shutdown`` (Twisted's own comment calls it
    unnecessary: the descriptor is close-on-exec, so this process holds the
    only copy); ``close`` sends the FIN.
    """
    flush_now(transport)
    if not _nothing_buffered(transport):
        transport.loseConnection()
        return
    transport.disconnecting = True      # as loseConnection does: readers of this transport stop
    transport._shouldShutdown = False
    transport.connectionLost(Failure(main.CONNECTION_DONE))

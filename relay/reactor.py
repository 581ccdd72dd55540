"""relayd's reactor: Twisted's epoll reactor, tuned for many small replies.

Two changes to ``twisted.internet.epollreactor.EPollReactor``, both about the
cost per event, which is what limits a relay serving many SMTP sessions from
one process:

- **Output sent once per turn.**  Replies and commands written with
  ``relay.sendnow.write_now`` while the reactor handles a turn's events are
  sent when the turn ends (``OutputBatch``): one ``send`` per connection, and
  the peers waiting for them are woken together, not one per event.  The
  batch is also sent before the reactor blocks and before it disconnects
  everything at shutdown.
- **No per-event log context.**  Twisted wraps each event in
  ``log.callWithLogger`` (five Python calls that only set the legacy
  ``system`` field of ``twisted.python.log`` messages; relay logs with
  ``twisted.logger``).  Here an event goes straight to ``_doReadOrWrite``,
  which already logs and disconnects on an exception, as Twisted's does.

``relayd`` installs it (``install``); under ``twist``/``twistd`` pass
``--reactor=relay`` to use it (Twisted's default reactor works too, sending
at once).
"""

from __future__ import annotations

import errno
import sys

from twisted.internet import epollreactor
from twisted.logger import Logger

from relay.sendnow import OutputBatch

log = Logger()


class RelayReactor(epollreactor.EPollReactor):
    """EPollReactor with an ``output_batch`` sent at the end of each turn."""

    def __init__(self):
        self.output_batch = OutputBatch()
        super().__init__()

    def doPoll(self, timeout):
        batch = self.output_batch
        if batch.pending:       # written by timed calls or calls from threads
            batch.flush()
        if timeout is None:
            timeout = -1        # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:   # noqa: BLE001 - as log.callWithLogger: log and go on
                    log.failure("Unhandled error handling an event on {selectable!r}", selectable=selectable)
        if batch.pending:
            batch.flush()

    doIteration = doPoll

    def disconnectAll(self):
        try:
            self.output_batch.flush()
        except Exception:  # noqa: BLE001 - disconnect all the same
            log.failure("sending the last replies failed")
        return super().disconnectAll()


def install() -> RelayReactor:
    """Install a RelayReactor as Twisted's global reactor."""
    from twisted.internet.main import installReactor
    reactor = RelayReactor()
    installReactor(reactor)
    return reactor


def install_unless_installed() -> None:
    """Install a RelayReactor unless a reactor is already installed (relayd
    called in-process, as tests do, keeps the one it finds)."""
    if "twisted.internet.reactor" not in sys.modules:
        install()

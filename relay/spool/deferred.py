"""``DeferredSpool``: the synchronous spool run on a thread pool for relayd.

Database work never runs on the reactor thread.  The pool is owned here:
``start()`` before use, ``stop()`` (after the last call has finished) at
shutdown -- an un-stopped ThreadPool keeps the process alive, and
``ThreadPool.stop()`` drains its queue on the calling thread, so callers stop
submitting first (see ../shared/notes/twisted.md §9).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from relay.model import ClaimedMessage, NewMessage, Outcome, SpoolStatus
from relay.spool.sql import SQLSpool


class DeferredSpool:
    """The ISpool methods relayd needs, each returning a Deferred."""

    def __init__(self, spool: SQLSpool, reactor, *, threads: int = 2):
        self.spool = spool
        self.url = spool.url
        #: SQLite's FreeSpaceFloor (read on the reactor thread by the
        #: listener's check at MAIL and by /metrics; cached), or None.
        self.free_space = spool.free_space
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="relay-spool")
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        """Join the pool's threads and close the database connections."""
        if self._started:
            self._started = False
            self._pool.stop()
        self.spool.close()

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def claim(self, node: str, now: float, lease: float, limit: int,
              exclude_domains: Sequence[str] = ()) -> "Deferred[list[ClaimedMessage]]":
        return self._run(self.spool.claim, node, now, lease, limit, exclude_domains)

    def renew(self, node: str, now: float, lease: float,
              recipient_ids: Sequence[int] | None = None) -> "Deferred[int]":
        return self._run(self.spool.renew, node, now, lease,
                         None if recipient_ids is None else list(recipient_ids))

    def release(self, node: str, recipient_ids: Sequence[int], now: float) -> "Deferred[int]":
        return self._run(self.spool.release, node, list(recipient_ids), now)

    def recover(self, node: str, now: float) -> "Deferred[int]":
        return self._run(self.spool.recover, node, now)

    def record(self, node: str, now: float, outcomes: Sequence[Outcome],
               new_messages: Sequence[NewMessage] = ()) -> "Deferred[list[str]]":
        return self._run(self.spool.record, node, now, list(outcomes), list(new_messages))

    def enqueue(self, messages: Sequence[NewMessage], now: float) -> "Deferred[list[str]]":
        return self._run(self.spool.enqueue, list(messages), now)

    def enqueue_claimed(self, messages: Sequence[NewMessage], now: float, node: str,
                        lease: float) -> "Deferred[tuple[list[str], list[ClaimedMessage]]]":
        return self._run(self.spool.enqueue_claimed, list(messages), now, node, lease)

    def status(self, now: float) -> "Deferred[SpoolStatus]":
        return self._run(self.spool.status, now)

    def ping(self) -> "Deferred[None]":
        return self._run(self.spool.ping)

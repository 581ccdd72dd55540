"""SQLite only: every write of one relayd process goes through one DBAPI
connection, so its page cache stays valid between writes (SQLite drops a
connection's cache when another connection has written since its last
transaction, and re-reads the pages from the WAL)."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import event

from relay.errors import SpoolUnavailable
from relay.model import NewMessage, Outcome, State
from relay.spool import open_spool

T0 = 1_000_000.0


def message(n: int) -> NewMessage:
    return NewMessage(sender="s@example.org", recipients=(f"r{n}@example.org",),
                      data=b"Subject: hi\r\n\r\nbody\r\n")


def test_listener_commits_and_the_drains_writes_share_one_connection(tmp_path):
    spool = open_spool(f"sqlite:///{tmp_path / 'spool.db'}")
    used: list[int] = []
    event.listen(spool.engine, "checkout", lambda dbapi, record, proxy: used.append(id(dbapi)))
    try:
        for n in range(3):
            _, claimed = spool.enqueue_claimed([message(n)], T0 + n, "node-a", 300.0)   # the listener
            rid = claimed[0].recipients[0].id
            spool.record("node-a", T0 + n, [Outcome(recipient_id=rid, state=State.DELIVERED,   # the drain
                                                   code=250, response="ok")])
        spool.claim("node-a", T0 + 10, 300.0, 10)
        assert len(used) == 7 and len(set(used)) == 1
        assert spool.engine.pool.checkedout() == 0      # the listener's commit gave it back
        assert spool.status(T0 + 10).recipients["delivered"] == 3
    finally:
        spool.close()


def test_ping_takes_the_write_lock_and_writes_nothing(tmp_path):
    """WAL reads work while another process holds the write lock, so the ping
    also takes it (an empty write transaction): a lock held longer than the
    busy timeout fails the ping; a free one is given back with nothing written."""
    path = tmp_path / "spool.db"
    spool = open_spool(f"sqlite:///{path}", busy_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    try:
        spool.enqueue([message(1)], T0)
        version = other.execute("PRAGMA data_version").fetchone()[0]
        wal_size = (tmp_path / "spool.db-wal").stat().st_size
        spool.ping()
        assert other.execute("PRAGMA data_version").fetchone()[0] == version, "the ping wrote"
        assert (tmp_path / "spool.db-wal").stat().st_size == wal_size
        other.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(SpoolUnavailable, match="is locked by another process"):
            spool.ping()
        assert time.monotonic() - started < 10.0     # the busy timeout, not the other connection's pleasure
        other.execute("ROLLBACK")
        spool.ping()
        assert not spool._write_lock.locked()
    finally:
        other.close()
        spool.close()

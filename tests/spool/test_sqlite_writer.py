"""SQLite only: every write of one relayd process goes through one DBAPI
connection, so its page cache stays valid between writes (SQLite drops a
connection's cache when another connection has written since its last
transaction, and re-reads the pages from the WAL)."""

from __future__ import annotations

from sqlalchemy import event

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

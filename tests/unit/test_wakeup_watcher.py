"""The SQLite change watcher (relay.wakeup): it notices commits by other
connections, and it reads ``PRAGMA data_version`` every ``interval`` while
the drain is idle but only every ``busy_interval()`` while the drain is
delivering (a wake-up waits that long then anyway, and each read takes the
GIL from the busy reactor thread).

The watcher's stop event is replaced by one that records each wait's
timeout and waits only a millisecond, so no test sleeps for the intervals.
"""

from __future__ import annotations

import sqlite3
import threading

from relay.testing import CallingReactor
from relay.wakeup import SQLiteChangeWatcher


class _RecordingStop(threading.Event):
    """The watcher's stop event: records each wait's timeout, waits 1 ms."""

    def __init__(self):
        super().__init__()
        self.timeouts: list[float] = []
        self.waited = threading.Condition()

    def wait(self, timeout=None):
        with self.waited:
            self.timeouts.append(timeout)
            self.waited.notify_all()
        return super().wait(0.001)

    def next_timeouts(self, n: int) -> list[float]:
        """The timeouts of the next ``n`` waits from now."""
        with self.waited:
            start = len(self.timeouts)
            assert self.waited.wait_for(lambda: len(self.timeouts) >= start + n, timeout=10)
            return self.timeouts[start:start + n]


def _watch(tmp_path, busy_interval):
    path = tmp_path / "spool.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    changes = threading.Semaphore(0)
    watcher = SQLiteChangeWatcher(str(path), CallingReactor(), changes.release, interval=0.005,
                                  busy_interval=busy_interval)
    watcher.stop_event_factory = _RecordingStop
    return watcher, other, changes


def test_idle_reads_every_interval_and_busy_every_wake_delay(tmp_path):
    busy = [0.0]
    watcher, other, changes = _watch(tmp_path, lambda: busy[0])
    watcher.startService()
    try:
        assert watcher._stop.next_timeouts(3) == [0.005] * 3
        busy[0] = 0.05
        assert watcher._stop.next_timeouts(4)[1:] == [0.05] * 3
        busy[0] = 0.0
        assert watcher._stop.next_timeouts(4)[1:] == [0.005] * 3
    finally:
        watcher.stopService()
        other.close()


def test_a_commit_by_another_connection_is_noticed_idle_and_busy(tmp_path):
    busy = [0.0]
    watcher, other, changes = _watch(tmp_path, lambda: busy[0])
    watcher.startService()
    try:
        watcher._stop.next_timeouts(2)            # the watcher has read data_version once
        other.execute("INSERT INTO t VALUES (1)")
        assert changes.acquire(timeout=10)
        busy[0] = 0.05
        watcher._stop.next_timeouts(2)
        other.execute("INSERT INTO t VALUES (2)")
        assert changes.acquire(timeout=10)
        assert not changes.acquire(timeout=0.05)  # one notification per commit, none without
    finally:
        watcher.stopService()
        other.close()


def test_a_restart_leaves_one_watcher_thread(tmp_path):
    """stop then start at once: the first thread ends (it keeps its own stop
    event) instead of running on beside the new one."""
    watcher, other, changes = _watch(tmp_path, lambda: 0.0)
    try:
        watcher.startService()
        first = watcher._thread
        watcher.stopService()
        watcher.startService()
        first.join(10)
        assert not first.is_alive()
        assert watcher._thread.is_alive()
        assert [t for t in threading.enumerate() if t.name == watcher.name] == [watcher._thread]
    finally:
        watcher.stopService()
        other.close()

"""relay.wakeup.PostgresNotifyListener against the real PostgreSQL server:
it wakes on NOTIFY, and after ``check_interval`` without one it checks its
connection with a query (a session ended behind a silent path would
otherwise look alive for ever)."""

from __future__ import annotations

import threading
import time

import psycopg
from twisted.trial import unittest

from relay.testing import scratch_pg_url
from relay.wakeup import CHANNEL, PostgresNotifyListener


class _CallingReactor:
    """callFromThread runs the call at once, on the listener's thread."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def _backend(conninfo: str, application_name: str) -> tuple[int, str] | None:
    """(pid, last query) of the other session with that application_name."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute("SELECT pid, query FROM pg_stat_activity "
                            "WHERE application_name = %s AND pid <> pg_backend_pid()",
                            [application_name]).fetchone()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class PostgresNotifyListenerTests(unittest.TestCase):

    def setUp(self):
        url = scratch_pg_url(self)
        self.name = f"relay-listen-test-{time.time_ns()}"
        self.url = url + ("&" if "?" in url else "?") + f"application_name={self.name}"
        self.wakes = threading.Semaphore(0)
        self.listener = PostgresNotifyListener(self.url, _CallingReactor(), self.wakes.release,
                                               wait=0.05, check_interval=0.3)
        self.listener.startService()
        self.addCleanup(self.listener.stopService)
        self.assertTrue(self.listener.connected.wait(10))
        self.assertTrue(self.wakes.acquire(timeout=10))      # the wake-up after (re)connecting
        self.plain = self.listener.conninfo

    def test_notify_wakes_and_a_quiet_connection_is_checked(self):
        with psycopg.connect(self.plain, autocommit=True) as conn:
            conn.execute(f"NOTIFY {CHANNEL}")
        self.assertTrue(self.wakes.acquire(timeout=10))
        pid, _ = _wait_for(lambda: _backend(self.plain, self.name), 10, "the listener's session")
        # Quiet for check_interval: the listener's last query becomes its check.
        _wait_for(lambda: (_backend(self.plain, self.name) or (0, ""))[1] == "SELECT 1", 10, "the check query")
        self.assertEqual(_backend(self.plain, self.name)[0], pid, "same session, no reconnect")

    def test_a_session_ended_by_the_server_is_replaced(self):
        pid, _ = _wait_for(lambda: _backend(self.plain, self.name), 10, "the listener's session")
        with psycopg.connect(self.plain, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        self.assertTrue(self.wakes.acquire(timeout=15), "a wake-up after listening again")
        new_pid, query = _wait_for(lambda: (b := _backend(self.plain, self.name)) and b[0] != pid and b,
                                   10, "a new session")
        self.assertNotEqual(new_pid, pid)
        with psycopg.connect(self.plain, autocommit=True) as conn:
            conn.execute(f"NOTIFY {CHANNEL}")
        self.assertTrue(self.wakes.acquire(timeout=10), "NOTIFY heard on the new session")

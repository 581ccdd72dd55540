"""relay.wakeup.PostgresNotifyListener against the real PostgreSQL server:
it wakes on NOTIFY, and after ``check_interval`` without one it checks its
connection with a query (a session ended behind a silent path would
otherwise look alive for ever)."""

from __future__ import annotations

import threading
import time

import psycopg
from twisted.internet import defer
from twisted.trial import unittest

from relay.testing import CallingReactor, scratch_pg_url, wait_until
from relay.wakeup import CHANNEL, PostgresNotifyListener


def _backend(conninfo: str, application_name: str) -> tuple[int, str] | None:
    """(pid, last query) of the newest session with that application_name.
    The probe names itself otherwise, so that neither it nor an earlier
    probe's session, still ending, can be taken for the listener's."""
    with psycopg.connect(conninfo, autocommit=True, application_name="relay-listen-probe") as conn:
        return conn.execute("SELECT pid, query FROM pg_stat_activity WHERE application_name = %s "
                            "ORDER BY backend_start DESC LIMIT 1", [application_name]).fetchone()


class PostgresNotifyListenerTests(unittest.TestCase):

    def setUp(self):
        url = scratch_pg_url(self)
        self.name = f"relay-listen-test-{time.time_ns()}"
        self.url = url + ("&" if "?" in url else "?") + f"application_name={self.name}"
        self.wakes = threading.Semaphore(0)
        self.listener = PostgresNotifyListener(self.url, CallingReactor(), self.wakes.release,
                                               wait=0.05, check_interval=0.3)
        self.listener.startService()
        self.addCleanup(self.listener.stopService)
        self.assertTrue(self.listener.connected.wait(10))
        self.assertTrue(self.wakes.acquire(timeout=10))      # the wake-up after (re)connecting
        self.plain = self.listener.conninfo

    @defer.inlineCallbacks
    def test_notify_wakes_and_a_quiet_connection_is_checked(self):
        with psycopg.connect(self.plain, autocommit=True, application_name="relay-listen-probe") as conn:
            conn.execute(f"NOTIFY {CHANNEL}")
        self.assertTrue(self.wakes.acquire(timeout=10))
        pid, _ = yield wait_until(lambda: _backend(self.plain, self.name), timeout=10)
        # Quiet for check_interval: the listener's last query becomes its check.
        yield wait_until(lambda: (_backend(self.plain, self.name) or (0, ""))[1] == "SELECT 1", timeout=10)
        self.assertEqual(_backend(self.plain, self.name)[0], pid, "same session, no reconnect")

    @defer.inlineCallbacks
    def test_a_session_ended_by_the_server_is_replaced(self):
        pid, _ = yield wait_until(lambda: _backend(self.plain, self.name), timeout=10)
        with psycopg.connect(self.plain, autocommit=True, application_name="relay-listen-probe") as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        self.assertTrue(self.wakes.acquire(timeout=15), "a wake-up after listening again")
        yield wait_until(lambda: (b := _backend(self.plain, self.name)) and b[0] != pid, timeout=10)
        with psycopg.connect(self.plain, autocommit=True, application_name="relay-listen-probe") as conn:
            conn.execute(f"NOTIFY {CHANNEL}")
        self.assertTrue(self.wakes.acquire(timeout=10), "NOTIFY heard on the new session")

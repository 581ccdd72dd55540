"""Instant wake-ups: tell the drain that new mail was queued, from any process.

* PostgreSQL: every enqueue (relayctl, the Python API, the submission
  listener, DSNs) runs ``NOTIFY relay_queue`` in its transaction, so the
  notification arrives at commit.  :class:`PostgresNotifyListener` keeps a
  dedicated connection that LISTENs and re-LISTENs after a reconnect
  (notifications sent while it was disconnected are lost, so it wakes the
  drain once after every reconnect).
* SQLite: :class:`SQLiteChangeWatcher` reads ``PRAGMA data_version`` on its
  own connection every few milliseconds while relayd is idle; it changes when
  another connection commits, so a ``relayctl enqueue`` in another process is
  seen at once.  While relayd is delivering it reads it only as often as the
  drain would act on a wake-up anyway (``busy_claim_delay``): each read takes
  the GIL from the busy reactor thread, which costs far more than the read.

Both block in a thread of their own (never the reactor thread, never the
spool's pool) and report through ``reactor.callFromThread``.  Polling in the
drain stays as the safety net.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Callable

from sqlalchemy.engine import make_url
from twisted.application import service
from twisted.logger import Logger

from relay.spool.engine import pg_connection_options

log = Logger(namespace="relay")

CHANNEL = "relay_queue"


class _WatcherThread(service.Service):
    """A service running ``self._run(stop)`` in a daemon thread.

    Each start makes a new ``stop`` event for its thread, so a thread still
    winding down after a stop never sees a later start's event cleared (it
    would run on beside the new one)."""

    #: Makes each run's stop event (tests substitute one that records waits).
    stop_event_factory = threading.Event

    def __init__(self, reactor, on_change: Callable[[], None]):
        self.reactor = reactor
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _notify(self) -> None:
        self.reactor.callFromThread(self.on_change)

    def startService(self) -> None:
        service.Service.startService(self)
        self._stop = stop = self.stop_event_factory()
        self._thread = threading.Thread(target=self._run, args=(stop,), name=self.name, daemon=True)
        self._thread.start()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self._stop.set()     # the thread notices within one wait interval; it is a daemon thread

    def _run(self, stop: threading.Event) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class PostgresNotifyListener(_WatcherThread):
    """LISTEN on the spool's database and wake the drain on every NOTIFY."""

    name = "pg-listen"

    def __init__(self, url: str, reactor, on_change: Callable[[], None], *, wait: float = 1.0,
                 retry_delay: float = 1.0, check_interval: float = 30.0):
        super().__init__(reactor, on_change)
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        #: libpq options: keepalives and tcp_user_timeout, as the spool's own connections
        self.connection_options = pg_connection_options(url)
        self.wait = wait
        self.retry_delay = retry_delay
        #: After this long without a notification the connection is checked
        #: with a query: a session the server ended behind a silent path (a
        #: frozen proxy, a lost FIN) would otherwise look alive for ever.
        self.check_interval = check_interval
        self.connected = threading.Event()

    def connect(self):
        """A new psycopg connection in autocommit, LISTENing on CHANNEL."""
        import psycopg

        conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5, **self.connection_options)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                with self.connect() as conn:
                    self.connected.set()
                    self.reactor.callFromThread(log.info, "listening for new mail on PostgreSQL{again}",
                                                again=" again" if failures else "")
                    failures = 0
                    self._notify()      # anything queued while we were not listening
                    heard = time.monotonic()
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=self.wait, stop_after=1):
                            self._notify()
                            heard = time.monotonic()
                            break
                        else:
                            if time.monotonic() - heard >= self.check_interval:
                                conn.execute("SELECT 1")
                                heard = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect
                self.connected.clear()
                if stop.is_set():
                    return
                failures += 1
                if failures == 1:
                    self.reactor.callFromThread(
                        log.warn, "lost the PostgreSQL LISTEN connection ({error}); polling until it is back",
                        error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                stop.wait(min(30.0, self.retry_delay * failures))


class SQLiteChangeWatcher(_WatcherThread):
    """Watch an SQLite spool file for commits by other connections."""

    name = "sqlite-watch"

    def __init__(self, path: str, reactor, on_change: Callable[[], None], *, interval: float = 0.005,
                 busy_interval: Callable[[], float] = lambda: 0.0):
        super().__init__(reactor, on_change)
        self.path = path
        self.interval = interval
        #: How long the drain would wait before acting on a wake-up now (0 when
        #: idle); read from this thread, so it must only read plain attributes.
        self.busy_interval = busy_interval

    def _run(self, stop: threading.Event) -> None:
        conn = None
        last = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = sqlite3.connect(self.path, timeout=1.0, check_same_thread=False)
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if last is not None and version != last:
                    self._notify()
                last = version
            except sqlite3.Error:
                if conn is not None:
                    conn.close()
                conn, last = None, None
                time.sleep(0.5)
            stop.wait(max(self.interval, self.busy_interval()))
        if conn is not None:
            conn.close()


def build_wakeup_service(url: str, reactor, on_change: Callable[[], None], *,
                         busy_interval: Callable[[], float] = lambda: 0.0) -> service.Service | None:
    """The watcher for this spool's dialect (None for an in-memory SQLite spool);
    ``busy_interval`` is the drain's current wake-up delay (``DrainService.wake_delay``)."""
    if url.startswith("postgresql"):
        return PostgresNotifyListener(url, reactor, on_change)
    from relay.spool.engine import sqlite_path
    path = sqlite_path(url)
    return SQLiteChangeWatcher(path, reactor, on_change, busy_interval=busy_interval) if path else None

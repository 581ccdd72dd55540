"""Every PostgreSQL connection relay opens (the spool engine's pool, the
direct writer's and the LISTEN connection) has TCP keepalives and a
``tcp_user_timeout``, read back from the kernel's socket options; options
the spool URL sets itself win.  The spool's connections also have
``lock_timeout`` = the busy timeout, read back with SHOW."""

from __future__ import annotations

import os
import socket

from sqlalchemy import text
from sqlalchemy.engine import make_url
from twisted.trial import unittest

from relay.spool import open_spool
from relay.spool.engine import PG_CONNECTION_OPTIONS, create_spool_engine, pg_lock_timeout
from relay.testing import CallingReactor, scratch_pg_url
from relay.wakeup import PostgresNotifyListener

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


def socket_options(psycopg_conn) -> dict[str, int]:
    """The keepalive options of a psycopg connection's TCP socket."""
    sock = socket.socket(fileno=os.dup(psycopg_conn.pgconn.socket))
    try:
        return {
            "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()


def engine_socket_options(url: str) -> dict[str, int]:
    """socket_options of a connection from a new spool engine for ``url``."""
    engine = create_spool_engine(url)
    try:
        raw = engine.raw_connection()
        try:
            return socket_options(raw.driver_connection)
        finally:
            raw.close()
    finally:
        engine.dispose()


class KeepaliveTests(unittest.TestCase):

    def setUp(self):
        # A TCP connection (libpq ignores these options on a Unix socket).
        self.url = scratch_pg_url(self)
        host = make_url(self.url).host
        if not host or host.startswith("/"):
            reason = f"the test PostgreSQL is reached over a Unix socket ({host!r}); these options need TCP"
            if os.environ.get("CI"):
                self.fail(reason)       # CI never passes without the PostgreSQL tests
            raise unittest.SkipTest(reason)

    def test_engine_connections(self):
        self.assertEqual(engine_socket_options(self.url), PG_CONNECTION_OPTIONS)

    def test_direct_writer_connection(self):
        spool = open_spool(self.url)
        self.addCleanup(spool.close)
        raw = spool._direct._checkout()
        try:
            self.assertEqual(socket_options(raw.driver_connection), PG_CONNECTION_OPTIONS)
        finally:
            spool._direct._checkin(raw)

    def test_listen_connection(self):
        listener = PostgresNotifyListener(self.url, CallingReactor(), lambda: None)
        with listener.connect() as conn:
            self.assertEqual(socket_options(conn), PG_CONNECTION_OPTIONS)

    def test_the_url_wins(self):
        url = self.url + ("&" if "?" in self.url else "?") + "keepalives_idle=77&tcp_user_timeout=5000"
        expected = dict(PG_CONNECTION_OPTIONS, keepalives_idle=77, tcp_user_timeout=5000)
        self.assertEqual(engine_socket_options(url), expected)
        with PostgresNotifyListener(url, CallingReactor(), lambda: None).connect() as conn:
            self.assertEqual(socket_options(conn), expected)


def test_pg_lock_timeout_is_the_busy_timeout_within_postgresqls_range():
    url = "postgresql+psycopg://relay@db.example.com/relay"
    assert pg_lock_timeout(url, 5.0) == 5000
    assert pg_lock_timeout(url, 0.0001) == 1                # 0 would mean "no bound"
    assert pg_lock_timeout(url, 30 * 86400) == 0           # past 2**31-1 ms: no bound rather than an error
    assert pg_lock_timeout(url + "?options=-c%20lock_timeout%3D100", 5.0) is None   # the URL wins


class LockTimeoutTests(unittest.TestCase):

    def test_spool_connections_have_the_busy_timeout_as_lock_timeout(self):
        """Pooled and direct-writer connections alike (both come from the engine's pool)."""
        url = scratch_pg_url(self)
        for busy, shown in ((0.25, "250ms"), (30 * 86400, "0")):
            spool = open_spool(url, busy_timeout=busy)
            try:
                with spool.engine.connect() as conn:
                    self.assertEqual(conn.execute(text("SHOW lock_timeout")).scalar(), shown)
                raw = spool._direct._checkout()
                try:
                    self.assertEqual(raw.driver_connection.execute("SHOW lock_timeout").fetchone()[0], shown)
                finally:
                    spool._direct._checkin(raw)
            finally:
                spool.close()

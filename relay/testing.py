"""Test helpers shipped with relay: scripted SMTP peers and PostgreSQL scratch schemas.

``SMTPPeer`` is an aiosmtpd server (its own thread and asyncio loop) on a
loopback address, whose replies are scripted by the recipient's local part:

=================  ==========================================================
local part starts  reply
=================  ==========================================================
``temp``           ``450 4.2.0`` to RCPT
``perm``           ``550 5.1.1`` to RCPT
``once451``        ``451 4.3.0`` to RCPT the first time, 250 after that
``data451``        ``451 4.3.0`` after the final dot
``data554``        ``554 5.6.0`` after the final dot
``drop``           the connection is closed after the final dot, no reply
``slow``           the reply to the final dot comes after ``slow_seconds``
anything else      ``250``
=================  ==========================================================

It records every accepted message and counts connections (total and peak
concurrent), which the grouping and connection-reuse tests assert on.  It
offers SMTPUTF8 (RFC 6531) as aiosmtpd's Controller does by default; with
``smtputf8=False`` it does not.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    """One message a peer accepted."""

    sender: str
    recipients: list[str]
    data: bytes                  # after dot-unstuffing, as the client meant it
    mail_options: list[str]
    connection: int              # which connection (1, 2, ...) carried it


@dataclass
class PeerLog:
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    peak_connections: int = 0
    transactions_per_connection: dict[int, int] = field(default_factory=dict)
    rcpt_seen: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for m in self.messages for r in m.recipients]


class ScriptedHandler:
    """aiosmtpd handler implementing the table in the module docstring."""

    def __init__(self, log: PeerLog, slow_seconds: float = 5.0, pipelining: bool = False):
        self.log = log
        self.slow_seconds = slow_seconds
        self.pipelining = pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd reads commands one line at a time, so it serves pipelined
        # clients; it just does not say so.  Real MTAs (Postfix) do.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        with self.log.lock:
            seen = self.log.rcpt_seen.get(address, 0)
            self.log.rcpt_seen[address] = seen + 1
        if local.startswith("temp"):
            return "450 4.2.0 Mailbox temporarily unavailable"
        if local.startswith("perm"):
            return "550 5.1.1 No such user"
        if local.startswith("once451") and seen == 0:
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        locals_ = [r.split("@", 1)[0].lower() for r in envelope.rcpt_tos]
        if any(l.startswith("data451") for l in locals_):
            return "451 4.3.0 Try again later"
        if any(l.startswith("data554") for l in locals_):
            return "554 5.6.0 Message rejected"
        conn_no = getattr(session, "relay_connection_number", 0)
        received = Received(sender=envelope.mail_from, recipients=list(envelope.rcpt_tos),
                            data=envelope.original_content or b"", mail_options=list(envelope.mail_options),
                            connection=conn_no)
        if any(l.startswith("drop") for l in locals_):
            with self.log.lock:
                self.log.messages.append(received)
            server.transport.close()
            return "250 never seen"
        if any(l.startswith("slow") for l in locals_):
            await asyncio.sleep(self.slow_seconds)
        with self.log.lock:
            self.log.messages.append(received)
            self.log.transactions_per_connection[conn_no] = self.log.transactions_per_connection.get(conn_no, 0) + 1
        return "250 2.0.0 Queued"


class _CountingSMTP(SMTP):
    def __init__(self, *args, peer_log: PeerLog, **kwargs):
        super().__init__(*args, **kwargs)
        self._peer_log = peer_log

    def connection_made(self, transport):
        with self._peer_log.lock:
            self._peer_log.connections += 1
            self._peer_log.open_connections += 1
            self._peer_log.peak_connections = max(self._peer_log.peak_connections,
                                                  self._peer_log.open_connections)
            number = self._peer_log.connections
        super().connection_made(transport)
        self.session.relay_connection_number = number

    def connection_lost(self, exc):
        with self._peer_log.lock:
            self._peer_log.open_connections -= 1
        super().connection_lost(exc)


class _PeerController(Controller):
    def __init__(self, handler, peer_log: PeerLog, **kwargs):
        self._peer_log = peer_log
        super().__init__(handler, **kwargs)

    def factory(self):
        return _CountingSMTP(self.handler, peer_log=self._peer_log, **self.SMTP_kwargs)


class SMTPPeer:
    """A scripted SMTP server on ``host:port`` (loopback only) for tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, slow_seconds: float = 5.0,
                 data_size_limit: int | None = None, pipelining: bool = False, smtputf8: bool = True):
        if not (host.startswith("127.") or host == "::1"):
            raise ValueError("test peers listen on loopback addresses only")
        self.host = host
        self.port = port or free_port(host)
        self.log = PeerLog()
        kwargs = {}
        if data_size_limit is not None:
            kwargs["data_size_limit"] = data_size_limit
        kwargs["enable_SMTPUTF8"] = smtputf8     # aiosmtpd's Controller offers it unless told otherwise
        self.controller = _PeerController(ScriptedHandler(self.log, slow_seconds, pipelining), self.log,
                                          hostname=host, port=self.port, ready_timeout=10, **kwargs)

    def start(self) -> "SMTPPeer":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> "SMTPPeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CallingReactor:
    """Stands in for the reactor of code that only reports from its own
    threads: ``callFromThread`` runs the call at once, on the calling thread
    (relay.wakeup's watchers in tests)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- PostgreSQL scratch schemas ------------------------------------------

PG_SERVER_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_schema_url(schema: str, server_url: str = PG_SERVER_URL) -> str:
    """``server_url`` with ``search_path`` set to ``schema``."""
    sep = "&" if "?" in server_url else "?"
    return f"{server_url}{sep}options={quote(f'-csearch_path={schema}')}"


def create_pg_schema(server_url: str = PG_SERVER_URL) -> tuple[str, str]:
    """Create a fresh schema; return (its name, a spool URL using it).

    Raises whatever the driver raises when the server is unreachable.
    """
    from sqlalchemy import create_engine, text
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        schema = f"relay_test_{uuid.uuid4().hex[:12]}"
        with engine.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    finally:
        engine.dispose()
    return schema, pg_schema_url(schema, server_url)


def drop_pg_schema(schema: str, server_url: str = PG_SERVER_URL) -> None:
    from sqlalchemy import create_engine, text
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


# -- trial helpers ----------------------------------------------------------


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, clock=None):
    """A Deferred that polls ``predicate()`` on the reactor until it is true
    (firing with its value); it fails after ``timeout`` seconds."""
    import time as _time

    from twisted.internet import defer, task
    if clock is None:
        from twisted.internet import reactor as clock
    deadline = _time.monotonic() + timeout

    @defer.inlineCallbacks
    def loop():
        while True:
            value = predicate()
            if value:
                return value
            if _time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            yield task.deferLater(clock, interval, lambda: None)

    return loop()


def scratch_sqlite_url(test, prefix: str = "relay-test-") -> str:
    """A fresh SQLite spool URL in a temporary directory removed after ``test``
    (not trial's mktemp, which writes under the working directory)."""
    import shutil
    import tempfile
    directory = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, directory, True)
    return f"sqlite:///{directory}/spool.db"


def scratch_pg_url(test) -> str:
    """A fresh PostgreSQL schema's spool URL, dropped after ``test``.

    Skips the test when PostgreSQL is unreachable, except with ``$CI`` set,
    where that is a failure: CI never passes without PostgreSQL.
    """
    from twisted.trial.unittest import SkipTest
    try:
        schema, url = create_pg_schema()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        if os.environ.get("CI"):
            raise AssertionError(f"PostgreSQL is required in CI: {exc}") from exc
        raise SkipTest(f"PostgreSQL unreachable: {exc}")
    test.addCleanup(drop_pg_schema, schema)
    return url

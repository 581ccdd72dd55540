"""Engines for the two spool dialects, and the mapping of database errors.

SQLite: WAL journal, ``synchronous=FULL`` (durable across power loss),
foreign keys on, a busy timeout, and ``BEGIN IMMEDIATE`` for write
transactions so that a writer waits for the lock up front instead of failing
when it upgrades a read lock.  PostgreSQL: psycopg 3, pre-ping so a restarted
server is reconnected to transparently, TCP keepalives with a bound on
unacknowledged data (``PG_CONNECTION_OPTIONS``) so that a server or path
that died silently fails a statement within about a minute, and
``lock_timeout`` = the busy timeout, so that a lock another session holds
fails a statement as "locked" (as SQLite's busy timeout does) instead of
holding it for ever.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from relay.config import redact_url
from relay.errors import SpoolUnavailable


#: libpq options of every PostgreSQL connection (the spool's and the LISTEN
#: connection): TCP keepalives, and a bound (ms) on data left unacknowledged,
#: so that a server or path that died without a word (a crashed host, a
#: dropped route) fails the statement within about a minute instead of after
#: the kernel's retransmission timeout (15 minutes or more) or, for an idle
#: connection, two hours.  libpq ignores them on Unix-domain sockets.
PG_CONNECTION_OPTIONS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                         "keepalives_count": 3, "tcp_user_timeout": 30_000}


def pg_connection_options(url: str) -> dict:
    """PG_CONNECTION_OPTIONS but those the spool URL sets itself (its query wins)."""
    given = make_url(url).query
    return {k: v for k, v in PG_CONNECTION_OPTIONS.items() if k not in given}


#: PostgreSQL's largest lock_timeout (ms); a longer busy_timeout waits without a bound.
PG_MAX_LOCK_TIMEOUT = 2 ** 31 - 1


def pg_lock_timeout(url: str, busy_timeout: float) -> int | None:
    """The ``lock_timeout`` (ms) the spool's PostgreSQL sessions get: the busy
    timeout (at least 1 ms; 0 = no bound past PostgreSQL's limit), or None
    when the URL's ``options`` set one (the URL wins)."""
    if "lock_timeout" in str(make_url(url).query.get("options", "")):
        return None
    ms = max(1, int(busy_timeout * 1000))
    return ms if ms <= PG_MAX_LOCK_TIMEOUT else 0


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///PATH`` URL (None for in-memory)."""
    db = make_url(url).database
    return db if db and db != ":memory:" else None


def create_spool_engine(url: str, *, busy_timeout: float = 5.0, pool_size: int = 5) -> Engine:
    """An Engine for a spool URL, with the dialect's durability settings."""
    if is_sqlite(url):
        path = sqlite_path(url)
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise SpoolUnavailable(f"The spool directory {parent} cannot be created: {e.strerror}.") from None
        engine = create_engine(
            url,
            connect_args={"timeout": busy_timeout, "check_same_thread": False},
            pool_size=pool_size, max_overflow=pool_size,
            # The most recently used connection first: its page cache is the
            # warmest (a connection rereads what others changed since it last ran).
            pool_use_lifo=True,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
            dbapi_conn.isolation_level = None      # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            _set_wal(cur, busy_timeout)
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_use_lifo=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={"connect_timeout": max(1, int(busy_timeout)), **pg_connection_options(url)},
    )

    lock_timeout = pg_lock_timeout(url, busy_timeout)
    if lock_timeout is not None:
        @event.listens_for(engine, "connect")
        def _pg_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every PostgreSQL test
            # A statement that waits longer than busy_timeout for a lock another
            # session holds (an operator's open transaction, a schema upgrade)
            # fails as "locked" instead of holding a spool thread, a client
            # waiting for its 250 and relayd's shutdown for as long as the other
            # session likes.  A SET rather than the startup "options" parameter,
            # which PgBouncer refuses (in its session pooling; a SET does not
            # stay with a client in transaction pooling, where LISTEN fails too).
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET lock_timeout = {lock_timeout}")
            dbapi_conn.commit()

    return engine


def _set_wal(cursor, busy_timeout: float) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock.

    When two processes open a new spool file at once, both switch it to WAL
    and SQLite answers "database is locked" at once, without the busy
    handler (it would deadlock), so the wait is done here.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def write_options(dialect: str) -> dict:
    """Execution options that start a write transaction on this dialect."""
    return {"sqlite_begin": "IMMEDIATE"} if dialect == "sqlite" else {}


def _sentence(url: str, exc: BaseException) -> str:
    text = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    where = redact_url(url)
    if "locked" in low or "busy" in low or "lock timeout" in low:
        return f"The spool {where} is locked by another process; try again."
    if "disk is full" in low or "database or disk is full" in low or "no space" in low:
        return f"The spool {where} is full (no space left); nothing was written."
    if "readonly" in low or "read-only" in low:
        return f"The spool {where} is read-only; nothing was written."
    if "unable to open" in low:
        return f"The spool {where} cannot be opened."
    if "no such table" in low or ("relation" in low and "does not exist" in low):
        return f"The spool {where} has no relay schema; run `relayctl db upgrade`."
    return f"The spool {where} is unavailable: {text.rstrip('.')}."


@contextmanager
def spool_errors(url: str) -> Iterator[None]:
    """Turn driver errors into SpoolUnavailable with one sentence."""
    try:
        yield
    except IntegrityError:
        raise
    except (OperationalError, InterfaceError, DBAPIError) as e:
        raise SpoolUnavailable(_sentence(url, e)) from e
    except OSError as e:
        raise SpoolUnavailable(f"The spool {redact_url(url)} is unavailable: {e.strerror or e}.") from e

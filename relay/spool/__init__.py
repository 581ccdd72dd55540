"""The spool: messages and recipients in SQLite or PostgreSQL.

``open_spool(url)`` returns an :class:`relay.interfaces.ISpool` provider for
the URL's dialect, with its schema checked (and created if the database is
empty).
"""

from __future__ import annotations

from relay.spool.engine import create_spool_engine
from relay.spool.migrate import ensure_schema, upgrade
from relay.spool.sql import SQLSpool, new_queue_id

__all__ = ["open_spool", "SQLSpool", "new_queue_id", "upgrade"]


def open_spool(url: str, *, busy_timeout: float = 5.0, initialise: bool = True,
               check_schema: bool = True, pool_size: int = 5, min_free_space: int = 0) -> SQLSpool:
    """Open the spool at ``url``.

    ``initialise``: create the schema when the database is empty.
    ``check_schema``: refuse a spool whose schema is not this relay's head
    (``relayctl db upgrade`` passes False).
    ``min_free_space``: on SQLite, refuse new mail that would leave less
    free on the spool's file system (relay.spool.space; 0 = no floor).
    """
    engine = create_spool_engine(url, busy_timeout=busy_timeout, pool_size=pool_size)
    try:
        if check_schema:
            ensure_schema(engine, url, initialise=initialise)
    except BaseException:
        engine.dispose()
        raise
    return SQLSpool(engine, url, busy_timeout=busy_timeout, min_free_space=min_free_space)

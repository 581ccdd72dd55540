"""Schema versions: Alembic upgrades, and the check every opener makes.

``upgrade`` runs the Alembic migrations in ``migrations/`` inside one write
transaction, serialised against other openers (``BEGIN IMMEDIATE`` on
SQLite, an advisory lock on PostgreSQL), so two processes initialising the
same empty spool cannot collide.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from relay.config import redact_url
from relay.errors import SpoolUnavailable
from relay.spool.engine import spool_errors, write_options

_ADVISORY_LOCK = 0x72656C6179  # "relay"


def script_location() -> str:
    """Where the migration scripts are: the installed ``relay.migrations``
    package, or ``migrations/`` of a source checkout."""
    spec = importlib.util.find_spec("relay.migrations")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return str(Path(__file__).resolve().parents[2] / "migrations")


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", script_location())
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()  # type: ignore[return-value]


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def take_migration_lock(conn: Connection) -> None:
    """Take the migration lock (PostgreSQL); the schema work of this
    transaction waits for locks as long as it takes (the spool's connections
    otherwise give up after ``spool.busy_timeout``, see relay.spool.engine):
    another process's upgrade may take longer than that."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})")


def upgrade(engine: Engine, url: str, revision: str = "head") -> tuple[str | None, str]:
    """Bring the spool schema to ``revision``; return (before, after)."""
    with spool_errors(url):
        with engine.connect() as conn:
            conn = conn.execution_options(**write_options(conn.dialect.name))
            with conn.begin():
                take_migration_lock(conn)
                before = current_revision(conn)
                command.upgrade(alembic_config(conn), revision)
                after = current_revision(conn)
    return before, after  # type: ignore[return-value]


def downgrade(engine: Engine, url: str, revision: str) -> None:
    """Step the schema down (used by the migration tests)."""
    with spool_errors(url):
        with engine.connect() as conn:
            conn = conn.execution_options(**write_options(conn.dialect.name))
            with conn.begin():
                take_migration_lock(conn)
                command.downgrade(alembic_config(conn), revision)


def _schema_state(conn: Connection) -> tuple[str | None, bool]:
    """The schema revision, and whether the database has no spool tables at all."""
    current = current_revision(conn)
    return current, current is None and not inspect(conn).has_table("messages")


def ensure_schema(engine: Engine, url: str, *, initialise: bool = True) -> None:
    """Check that the spool has this relay's schema.

    An empty database is initialised (when ``initialise``); a spool behind
    this relay's head revision is refused with a sentence saying to run
    ``relayctl db upgrade``.
    """
    head = head_revision()
    with spool_errors(url):
        with engine.connect() as conn:
            current, empty = _schema_state(conn)
            conn.rollback()
        if current != head:
            # Look again under the migration lock: the two reads above may
            # straddle the commit of another opener's initialisation (no
            # version table yet, then tables), which would look like a
            # foreign database.  The lock waits for that upgrade to finish.
            with engine.connect() as conn:
                conn = conn.execution_options(**write_options(conn.dialect.name))
                with conn.begin():
                    take_migration_lock(conn)
                    current, empty = _schema_state(conn)
    if current == head:
        return
    if empty and initialise:
        upgrade(engine, url)
        return
    where = redact_url(url)
    if current is None:
        if empty:
            raise SpoolUnavailable(f"The spool {where} has no relay schema yet; run `relayctl db upgrade`.")
        raise SpoolUnavailable(f"The database {where} has tables but no relay schema version; "
                               f"it does not look like a relay spool.")
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current not in known:
        raise SpoolUnavailable(f"The spool {where} has schema revision {current}, which is newer than "
                               f"this relay knows; upgrade relay.")
    raise SpoolUnavailable(f"The spool {where} has schema revision {current} but this relay needs {head}; "
                           f"run `relayctl db upgrade`.")

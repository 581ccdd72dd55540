"""Alembic environment for the relay spool.

Run from relay (``relayctl db upgrade``), the connection is passed in through
``config.attributes["connection"]``.  Run from the ``alembic`` command line,
the spool URL comes from relay's own configuration ($RELAY_CONFIG,
$RELAY_SPOOL_URL, or the built-in SQLite default).
"""

from alembic import context

from relay.spool.schema import metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from relay.config import load_config
    from relay.spool.engine import create_spool_engine
    from relay.spool.migrate import take_migration_lock

    config = load_config()
    engine = create_spool_engine(config.spool_url, busy_timeout=config.spool_busy_timeout)
    with engine.connect() as conn:
        take_migration_lock(conn)      # as relayctl db upgrade: serialised, and waiting for locks
        _run(conn)
        conn.commit()
    engine.dispose()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("relay migrations run online only: give relay a spool URL.")
run()

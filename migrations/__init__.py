"""Alembic migrations of the relay spool (installed as ``relay.migrations``)."""

"""The spool schema as SQLAlchemy Core metadata.

This is the single source of truth for the tables; the Alembic migrations in
``migrations/`` must produce exactly this (a test compares them).

Times are POSIX timestamps (double precision seconds) chosen by the caller,
so every node and both dialects agree and tests can use an injected clock.

``recipients.next_attempt_at`` is set only while a recipient still needs a
delivery attempt: for ``queued``/``deferred`` it is when it is due, for
``inflight`` it equals the lease expiry (so an abandoned claim becomes due
again by the same index), and it is NULL for ``held``, ``delivered`` and
``bounced``.  "Due" is therefore one index range: ``next_attempt_at <= now``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# A 64-bit key on PostgreSQL; INTEGER (the rowid alias) on SQLite.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("sender", Text, nullable=False),              # "" is the null sender <>
    Column("size", BigInteger, nullable=False),
    Column("eight_bit", Boolean, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("subject", Text),
    Column("message_id_header", Text),
    Column("idempotency_key", String(255), unique=True),
    Column("data", LargeBinary, nullable=False),         # RFC 5322, CRLF, not dot-stuffed
    Index("ix_messages_created_at", "created_at"),
)

recipients = Table(
    "recipients",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(32), ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("address", Text, nullable=False),
    Column("domain", Text, nullable=False),             # lower-cased
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("queued_at", Double, nullable=False),
    Column("next_attempt_at", Double),
    Column("lease_owner", Text),
    Column("lease_expires_at", Double),
    Column("last_code", Integer),
    Column("last_response", Text),
    Column("updated_at", Double, nullable=False),
    Index("ix_recipients_due", "next_attempt_at", "id"),
    Index("ix_recipients_state_domain", "state", "domain"),
    Index("ix_recipients_state_queued_at", "state", "queued_at"),
    Index("ix_recipients_message_id", "message_id"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("recipient_id", _BigId, ForeignKey("recipients.id", ondelete="CASCADE"), nullable=False),
    Column("at", Double, nullable=False),
    Column("host", Text),
    Column("code", Integer),
    Column("response", Text),
    Index("ix_attempts_recipient_id", "recipient_id"),
)

"""The initial spool schema: messages, recipients and their attempt history.

Revision ID: 0001
Revises: 
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('messages',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('sender', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('eight_bit', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('message_id_header', sa.Text(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    op.create_index('ix_messages_created_at', 'messages', ['created_at'], unique=False)

    op.create_table('recipients',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.String(length=32), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('address', sa.Text(), nullable=False),
    sa.Column('domain', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('queued_at', sa.Double(), nullable=False),
    sa.Column('next_attempt_at', sa.Double(), nullable=True),
    sa.Column('lease_owner', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.Double(), nullable=True),
    sa.Column('last_code', sa.Integer(), nullable=True),
    sa.Column('last_response', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_recipients_due', 'recipients', ['next_attempt_at', 'id'], unique=False)
    op.create_index('ix_recipients_message_id', 'recipients', ['message_id'], unique=False)
    op.create_index('ix_recipients_state_domain', 'recipients', ['state', 'domain'], unique=False)
    op.create_index('ix_recipients_state_queued_at', 'recipients', ['state', 'queued_at'], unique=False)

    op.create_table('attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('recipient_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', sa.Double(), nullable=False),
    sa.Column('host', sa.Text(), nullable=True),
    sa.Column('code', sa.Integer(), nullable=True),
    sa.Column('response', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['recipient_id'], ['recipients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_attempts_recipient_id', 'attempts', ['recipient_id'], unique=False)



def downgrade() -> None:
    op.drop_index('ix_attempts_recipient_id', table_name='attempts')

    op.drop_table('attempts')
    op.drop_index('ix_recipients_state_queued_at', table_name='recipients')
    op.drop_index('ix_recipients_state_domain', table_name='recipients')
    op.drop_index('ix_recipients_message_id', table_name='recipients')
    op.drop_index('ix_recipients_due', table_name='recipients')

    op.drop_table('recipients')
    op.drop_index('ix_messages_created_at', table_name='messages')

    op.drop_table('messages')

"""Accounts (password hash, role), webhooks with a delivery outbox, review undo.

`users.password_hash` / `users.role` for dashboard login and roles; `webhooks` and
`webhook_deliveries` for signed job events; `reviews.undoes_id` and the `undone` decision so
"undo" appends a row instead of deleting one (reviews stay append-only).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 07:05:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_DECISIONS = ('approved', 'corrected', 'rejected')
_NEW_DECISIONS = ('approved', 'corrected', 'rejected', 'undone')


def _decision_check(values: tuple[str, ...]) -> str:
    return 'decision IN (' + ', '.join(f"'{v}'" for v in values) + ')'


def upgrade() -> None:
    with op.batch_alter_table('users') as batch_op:
        batch_op.add_column(sa.Column('password_hash', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('role', sa.Enum('admin', 'reviewer', 'submitter', name='user_role', native_enum=False, create_constraint=True, length=16), server_default='submitter', nullable=False))

    with op.batch_alter_table('reviews') as batch_op:
        batch_op.add_column(sa.Column('undoes_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_reviews_undoes_id_reviews'), 'reviews', ['undoes_id'], ['id'], ondelete='SET NULL')
        batch_op.drop_constraint(op.f('ck_reviews_review_decision'), type_='check')
        batch_op.create_check_constraint('review_decision', sa.text(_decision_check(_NEW_DECISIONS)))

    op.create_table('webhooks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('secret', sa.String(length=200), nullable=False),
    sa.Column('events', sa.JSON(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_webhooks_owner_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhooks'))
    )
    op.create_index(op.f('ix_webhooks_owner_id'), 'webhooks', ['owner_id'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('webhook_id', sa.Integer(), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'delivered', 'failed', name='webhook_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('response_status', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_webhook_deliveries_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['webhook_id'], ['webhooks.id'], name=op.f('fk_webhook_deliveries_webhook_id_webhooks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('webhook_id', 'event', 'job_id', name=op.f('uq_webhook_deliveries_webhook_id_event_job_id'))
    )
    op.create_index(op.f('ix_webhook_deliveries_status'), 'webhook_deliveries', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_webhook_deliveries_status'), table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index(op.f('ix_webhooks_owner_id'), table_name='webhooks')
    op.drop_table('webhooks')
    op.execute("DELETE FROM reviews WHERE decision = 'undone'")
    with op.batch_alter_table('reviews') as batch_op:
        batch_op.drop_constraint(op.f('ck_reviews_review_decision'), type_='check')
        batch_op.create_check_constraint('review_decision', sa.text(_decision_check(_OLD_DECISIONS)))
        batch_op.drop_constraint(batch_op.f('fk_reviews_undoes_id_reviews'), type_='foreignkey')
        batch_op.drop_column('undoes_id')
    with op.batch_alter_table('users') as batch_op:
        batch_op.drop_constraint(op.f('ck_users_user_role'), type_='check')
        batch_op.drop_column('role')
        batch_op.drop_column('password_hash')

"""Per-user source grants, webhook secret rotation, and why a job ended early.

`users.source_prefixes`: object-store key prefixes an admin lets this user submit by key or
prefix. `webhooks.previous_secret` / `previous_secret_expires_at`: after a rotation the old
secret still signs deliveries for a grace period. `jobs.failure_reason`: a background step
(listing a prefix, fetching URLs) that failed for good ends the job with this reason.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 11:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('users') as batch_op:
        batch_op.add_column(
            sa.Column('source_prefixes', sa.JSON(), server_default='[]', nullable=False)
        )
    with op.batch_alter_table('webhooks') as batch_op:
        batch_op.add_column(sa.Column('previous_secret', sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column('previous_secret_expires_at', sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('failure_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('failure_reason')
    with op.batch_alter_table('webhooks') as batch_op:
        batch_op.drop_column('previous_secret_expires_at')
        batch_op.drop_column('previous_secret')
    with op.batch_alter_table('users') as batch_op:
        batch_op.drop_column('source_prefixes')

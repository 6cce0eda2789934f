"""Sessions that end when they should: a per-user session epoch and an admin's disable.

`users.session_epoch` is stamped into each login session; logout, a password change and a
disable bump it, so every copy of an older cookie stops working. `users.disabled_at`, set by an
admin, refuses login and tokens. Existing users start at epoch 0, enabled; cookies issued before
this release carry no epoch and must log in again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('users') as batch_op:
        batch_op.add_column(sa.Column('session_epoch', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users') as batch_op:
        batch_op.drop_column('disabled_at')
        batch_op.drop_column('session_epoch')

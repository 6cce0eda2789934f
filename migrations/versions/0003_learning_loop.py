"""The learning loop: one open training run at a time, reviewer exclusion.

`training_runs.open_lock` is 1 while a run is queued or running and NULL after; its UNIQUE
constraint lets only one open run exist (two beat processes racing insert one run).
`users.training_excluded_at` marks a reviewer whose reviews an admin left out of training.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 08:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('training_runs') as batch_op:
        batch_op.add_column(sa.Column('open_lock', sa.Integer(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_training_runs_open_lock'), ['open_lock'])
    with op.batch_alter_table('users') as batch_op:
        batch_op.add_column(sa.Column('training_excluded_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('users') as batch_op:
        batch_op.drop_column('training_excluded_at')
    with op.batch_alter_table('training_runs') as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_training_runs_open_lock'), type_='unique')
        batch_op.drop_column('open_lock')

"""Background exports, caption imports and the submitter's own image ids.

`exports`: one row per export file written in the background to the object store, with its
progress. `images.external_id`: the submitter's id for an image, carried into every export.
`captions.source`: "model" or "import"; an imported caption has no model version, so
`captions.model_version_id` becomes nullable.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 12:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('images') as batch_op:
        batch_op.add_column(sa.Column('external_id', sa.String(length=512), nullable=True))
    with op.batch_alter_table('captions') as batch_op:
        batch_op.add_column(
            sa.Column(
                'source',
                sa.Enum('model', 'import', name='caption_source', native_enum=False,
                        create_constraint=True, length=16),
                server_default='model',
                nullable=False,
            )
        )
        batch_op.alter_column('model_version_id', existing_type=sa.Integer(), nullable=True)
    op.create_table(
        'exports',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('owner_id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('format', sa.String(length=32), nullable=False),
        sa.Column('options', sa.JSON(), nullable=False),
        sa.Column(
            'status',
            sa.Enum('queued', 'running', 'done', 'failed', name='export_status',
                    native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column('rows_total', sa.Integer(), nullable=False),
        sa.Column('rows_done', sa.Integer(), nullable=False),
        sa.Column('object_key', sa.String(length=1024), nullable=True),
        sa.Column('size_bytes', sa.BigInteger(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_exports_owner_id', 'exports', ['owner_id'])
    op.create_index('ix_exports_job_id', 'exports', ['job_id'])


def downgrade() -> None:
    op.drop_index('ix_exports_job_id', table_name='exports')
    op.drop_index('ix_exports_owner_id', table_name='exports')
    op.drop_table('exports')
    with op.batch_alter_table('captions') as batch_op:
        batch_op.alter_column('model_version_id', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_constraint(op.f('ck_captions_caption_source'), type_='check')
        batch_op.drop_column('source')
    with op.batch_alter_table('images') as batch_op:
        batch_op.drop_column('external_id')

"""A job's images in id order, with or without a status filter, from an index; the sweeper's
over-the-attempt-cap lookup from an index.

The dashboard pages a job's images by id (`after` = the last id shown), optionally filtered by
status. `(job_id, status)` found the rows but left a sort of every matching row per page on a
big job; `(job_id, status, id)` and `(job_id, id)` serve both orders directly, and the first
replaces `(job_id, status)` for the claim-by-job and failure lookups. `(status, attempts)` lets
the sweeper find queued images past the attempt cap without reading every queued image.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_images_job_id_status_id', 'images', ['job_id', 'status', 'id'])
    op.create_index('ix_images_job_id_id', 'images', ['job_id', 'id'])
    op.create_index('ix_images_status_attempts', 'images', ['status', 'attempts'])
    op.drop_index('ix_images_job_id_status', table_name='images')


def downgrade() -> None:
    op.create_index('ix_images_job_id_status', 'images', ['job_id', 'status'])
    op.drop_index('ix_images_status_attempts', table_name='images')
    op.drop_index('ix_images_job_id_id', table_name='images')
    op.drop_index('ix_images_job_id_status_id', table_name='images')

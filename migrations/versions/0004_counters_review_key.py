"""Job counters kept live and the review-queue key.

`jobs.queued_count`, `running_count` and `unreviewed_count` join `captioned_count` and
`failed_count`, all now kept in the same transaction as each status change (progress is one row
read). `images.review_score` is the newest caption's score while the image awaits review, NULL
otherwise; two partial indexes serve "unreviewed, least confident first" over every job and
within one job. The upgrade fills both from the rows, set-based.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 08:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AWAITING = sa.text('review_score IS NOT NULL')

# The newest caption's score of every image that has one and whose current review is none or
# `undone`.
_FILL_REVIEW_SCORE = """
UPDATE images SET review_score = (
    SELECT c.score FROM captions c WHERE c.image_id = images.id ORDER BY c.id DESC LIMIT 1
)
WHERE EXISTS (SELECT 1 FROM captions c WHERE c.image_id = images.id)
  AND COALESCE(
    (SELECT r.decision FROM reviews r WHERE r.image_id = images.id ORDER BY r.id DESC LIMIT 1),
    'undone'
  ) = 'undone'
"""

# Every counter from one GROUP BY over the images.
_FILL_COUNTERS = """
UPDATE jobs SET
    image_count = counted.total,
    queued_count = counted.queued,
    running_count = counted.running,
    captioned_count = counted.captioned,
    failed_count = counted.failed,
    unreviewed_count = counted.unreviewed
FROM (
    SELECT job_id,
        count(*) AS total,
        sum(CASE WHEN status = 'queued' THEN 1 ELSE 0 END) AS queued,
        sum(CASE WHEN status = 'running' THEN 1 ELSE 0 END) AS running,
        sum(CASE WHEN status = 'captioned' THEN 1 ELSE 0 END) AS captioned,
        sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
        sum(CASE WHEN review_score IS NOT NULL THEN 1 ELSE 0 END) AS unreviewed
    FROM images
    GROUP BY job_id
) AS counted
WHERE jobs.id = counted.job_id
"""


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.add_column(sa.Column('queued_count', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('running_count', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('unreviewed_count', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('images') as batch_op:
        batch_op.add_column(sa.Column('review_score', sa.Float(), nullable=True))
    op.execute(_FILL_REVIEW_SCORE)
    op.execute(_FILL_COUNTERS)
    op.create_index('ix_images_review_score_id', 'images', ['review_score', 'id'], unique=False, sqlite_where=_AWAITING, postgresql_where=_AWAITING)
    op.create_index('ix_images_job_id_review_score_id', 'images', ['job_id', 'review_score', 'id'], unique=False, sqlite_where=_AWAITING, postgresql_where=_AWAITING)


def downgrade() -> None:
    op.drop_index('ix_images_job_id_review_score_id', table_name='images')
    op.drop_index('ix_images_review_score_id', table_name='images')
    with op.batch_alter_table('images') as batch_op:
        batch_op.drop_column('review_score')
    with op.batch_alter_table('jobs') as batch_op:
        batch_op.drop_column('unreviewed_count')
        batch_op.drop_column('running_count')
        batch_op.drop_column('queued_count')

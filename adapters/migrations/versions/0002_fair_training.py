"""Fair training across tenants: when each job last left a worker, and indexes for the queue.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

``jobs.released_at`` is the fair-share clock (``adapters.jobs.fair_share``): the claim serves
first the tenant whose jobs left a worker least recently. ``ix_jobs_status`` keeps the queue
scan off the finished jobs; ``ix_jobs_tenant_released`` answers "when did this tenant last
have a worker" from the index. Idempotent, like 0001: a database made by
``metadata.create_all`` (already complete) and stamped at 0001 passes through unchanged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "released_at" not in {c["name"] for c in inspector.get_columns("jobs")}:
        op.add_column("jobs", sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
    indexes = {i["name"] for i in inspector.get_indexes("jobs")}
    if "ix_jobs_status" not in indexes:
        op.create_index("ix_jobs_status", "jobs", ["status"], unique=False)
    if "ix_jobs_tenant_released" not in indexes:
        op.create_index("ix_jobs_tenant_released", "jobs", ["tenant_id", "released_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_released", table_name="jobs")
    op.drop_index("ix_jobs_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("released_at")

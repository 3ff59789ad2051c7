"""Tasks: every uploaded file and every job says which kind of task its data is for.

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-10

``files.task`` and ``jobs.task`` name the task kind (``adapters.tasks``: "text-classification"
or "image-classification"). Both are NOT NULL with the server default "text-classification":
every row written before this revision was text, and every caller that does not name a task
keeps meaning text. ``jobs.training_sha256`` / ``jobs.validation_sha256`` are the checksums of
the job's stored data, which the worker verifies when it reads the data back (null for jobs
submitted before: read unchecked, as they always were). Idempotent, like 0001 and 0002: a
database made by ``metadata.create_all`` (already complete) and stamped at 0001 passes through
unchanged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TEXT_CLASSIFICATION = "text-classification"  # frozen here: later renames are new revisions


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table in ("files", "jobs"):
        if "task" not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, sa.Column("task", sa.String(length=32), nullable=False,
                                           server_default=TEXT_CLASSIFICATION))
    columns = {c["name"] for c in inspector.get_columns("jobs")}
    for name in ("training_sha256", "validation_sha256"):
        if name not in columns:
            op.add_column("jobs", sa.Column(name, sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in ("task", "training_sha256", "validation_sha256"):
            batch.drop_column(name)
    with op.batch_alter_table("files") as batch:
        batch.drop_column("task")

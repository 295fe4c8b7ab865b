"""The schema's compatibility window: the oldest code revision that can run on it.

A worker refuses a database at a revision it does not know, unless that database says
the worker's own revision is still recent enough to read and write it: an image
rollback then works without touching the database. Each later migration that stays
compatible with the code before it leaves ``oldest_reader`` as it is; one that breaks
older code sets it to its own revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "schema_compatibility",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("oldest_reader", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schema_compatibility")),
    )
    # Code of revision 0001 knows nothing of this table and checks revisions exactly:
    # the window opens here.
    op.bulk_insert(table, [{"id": 1, "oldest_reader": "0002"}])


def downgrade() -> None:
    op.drop_table("schema_compatibility")

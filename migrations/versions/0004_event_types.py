"""Each user's event types, aligned with its items, for models that read them.

One nullable JSON column, ``{"at": event_count, "codes": "1121..."}``: one digit per
item (``model.sequences.TYPE_CODES``, 0 not known), and the ``event_count`` they were
written at. Code of revision 0003 appends items without touching the column, and the
count then no longer matches: the types are read as not known instead of misaligned.
So the compatibility window stays at 0002.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_sequences") as batch:
        batch.add_column(sa.Column("event_types", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("user_sequences") as batch:
        batch.drop_column("event_types")

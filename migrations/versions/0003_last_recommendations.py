"""Each user's last published recommendations, for online HR@K and NDCG@K.

The worker writes them in the transaction that applies the user's events, and scores
the user's next event against them. Nullable columns: code of revision 0002 reads and
writes user_sequences without them, so the compatibility window stays at 0002.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_sequences") as batch:
        batch.add_column(sa.Column("last_recommended", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("last_model_version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("user_sequences") as batch:
        batch.drop_column("last_model_version")
        batch.drop_column("last_recommended")

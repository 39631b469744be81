"""process supervision, terminal and usage columns

Revision ID: 7d3e1f2a9b40
Revises: fde9e0930b91
Create Date: 2026-12-01 13:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.store.models import UTCDateTime

# revision identifiers, used by Alembic.
revision: str = "7d3e1f2a9b40"
down_revision: str | Sequence[str] | None = "fde9e0930b91"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("process_record") as batch:
        batch.add_column(sa.Column("restarts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("ready", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("ready_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("oom_killed", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("terminal", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("cpu_sec", sa.Float(), nullable=True))
        batch.add_column(sa.Column("memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("memory_peak_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("processes_alive", sa.Integer(), nullable=True))
    # Processes recorded before readiness checks existed were ready once started.
    op.execute("UPDATE process_record SET ready = true, ready_at = started_at")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("process_record") as batch:
        for name in (
            "processes_alive",
            "memory_peak_bytes",
            "memory_bytes",
            "cpu_sec",
            "terminal",
            "oom_killed",
            "ready_at",
            "ready",
            "restarts",
        ):
            batch.drop_column(name)

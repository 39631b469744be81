"""What readiness and the metrics read of the store: its schema revision and what it says runs."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text
from sqlmodel import col

from app.domain import ProcessStatus
from app.store import models
from app.store.migrate import head_revisions
from app.store.session import Database

__all__ = ["capsule_counts", "current_revisions", "head_revisions", "running_process_counts"]


async def current_revisions(db: Database) -> frozenset[str]:
    """The revisions the store is at (empty for a store never migrated); Unavailable when unreachable."""
    async with db.session() as session:
        connection = await session.connection()
        try:
            rows = (await connection.execute(text("SELECT version_num FROM alembic_version"))).all()
        except sa_exc.DBAPIError as exc:  # no such table: never migrated
            # The driver's own words name the missing table (SQLAlchemy's add the statement, which
            # names it whatever went wrong); a lost connection is not a missing table.
            if exc.connection_invalidated or "alembic_version" not in str(exc.orig):
                raise
            return frozenset()
        return frozenset(str(row[0]) for row in rows)


async def capsule_counts(db: Database) -> dict[tuple[str, str], int]:
    """How many capsules each host has in each status."""
    query = select(col(models.Capsule.host_id), col(models.Capsule.status), func.count()).group_by(
        col(models.Capsule.host_id), col(models.Capsule.status)
    )
    async with db.session() as session:
        rows = (await (await session.connection()).execute(query)).all()
    return {(str(host), getattr(status, "value", str(status))): int(n) for host, status, n in rows}


async def running_process_counts(db: Database) -> dict[str, int]:
    """How many processes each host runs, as the store has it."""
    query = (
        select(col(models.Capsule.host_id), func.count())
        .select_from(models.ProcessRecord)
        .join(models.Capsule, col(models.Capsule.id) == col(models.ProcessRecord.capsule_id))
        .where(col(models.ProcessRecord.status) == ProcessStatus.RUNNING)
        .group_by(col(models.Capsule.host_id))
    )
    async with db.session() as session:
        rows = (await (await session.connection()).execute(query)).all()
    return {str(host): int(n) for host, n in rows}

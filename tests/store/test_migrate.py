"""Alembic migrations: upgrade from empty and back on both databases, and no drift from the models."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from app.domain import CapsuleRuntime, utcnow
from app.store.migrate import downgrade, upgrade
from app.store.repositories import CapsuleRepository
from app.store.session import Database

TABLES = {"alembic_version", "api_key", "capsule", "host", "process_event", "process_record", "team"}
# The revision before capsules had a runtime, network and limits.
BEFORE_RUNTIMES = "45caf6c2adab"


async def _tables(url: str) -> set[str]:
    db = Database(url)
    try:
        async with db.engine.connect() as connection:
            return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await db.dispose()


async def test_downgrade_to_empty_and_upgrade_again(database_url: str) -> None:
    assert await _tables(database_url) == TABLES
    await asyncio.to_thread(downgrade, database_url, "base")
    assert await _tables(database_url) == {"alembic_version"}
    await asyncio.to_thread(upgrade, database_url)
    assert await _tables(database_url) == TABLES
    await asyncio.to_thread(upgrade, database_url)  # at head already: nothing to do


async def test_capsules_made_before_runtimes_get_plain_and_the_default_limits(database_url: str) -> None:
    await asyncio.to_thread(downgrade, database_url, BEFORE_RUNTIMES)
    db = Database(database_url)
    try:
        async with db.engine.begin() as connection:
            await connection.execute(
                text("INSERT INTO team (id, name, created_at) VALUES (1, 'old', :now)"), {"now": utcnow()}
            )
            await connection.execute(
                text(
                    "INSERT INTO capsule (id, team_id, host_id, status, timeout_sec, created_at, "
                    "last_active_at) VALUES ('cap-old', 1, 'h1', 'RUNNING', 300, :now, :now)"
                ),
                {"now": utcnow()},
            )
        await db.engine.dispose()  # SQLite: the migration's own connection must not wait on this one
        await asyncio.to_thread(upgrade, database_url)
        async with db.session() as session:
            row = await CapsuleRepository(session, 1).get("cap-old")
    finally:
        await db.dispose()
    assert row is not None
    assert (row.runtime, row.network) == (CapsuleRuntime.PLAIN, False)
    assert (row.max_processes, row.memory_mib, row.cpus) == (256, None, None)


async def test_upgrade_creates_a_new_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh' / 'capsule.db'}"
    await asyncio.to_thread(upgrade, url)
    assert await _tables(url) == TABLES


async def test_models_match_the_migrations(database: Database) -> None:
    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))

    async with database.engine.connect() as connection:
        assert await connection.run_sync(differences) == []

"""Alembic migrations: upgrade from empty and back on both databases, and no drift from the models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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
from tests.system import command_env

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


def test_the_heads_read_from_the_files_are_alembics() -> None:
    from alembic.script import ScriptDirectory

    from app.store.migrate import alembic_config, head_revisions

    expected = ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_heads()
    assert head_revisions() == frozenset(expected)


def test_serve_migrates_in_a_child_and_never_loads_alembic(tmp_path: Path) -> None:
    probe = (
        "import asyncio, sys\n"
        "from app.cli.commands import migrate_apart\n"
        "from app.config import Settings\n"
        "from app.store import health\n"
        "from app.store.session import Database\n"
        f"settings = Settings(data_dir=__import__('pathlib').Path({str(tmp_path / 'data')!r}))\n"
        "migrate_apart(settings)\n"
        "db = Database(settings.database_url)\n"
        "current = asyncio.run(health.current_revisions(db))\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('alembic'))\n"
        "print(current == health.head_revisions(), loaded)\n"
    )
    env = {k: v for k, v in command_env().items() if not k.startswith("CAPSULE_")}
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[]"]


def test_a_migration_that_fails_in_its_child_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in command_env().items() if not k.startswith("CAPSULE_")}
    env |= {
        "CAPSULE_DATA_DIR": str(tmp_path),
        "CAPSULE_DATABASE_URL": "postgresql+asyncpg://127.0.0.1:1/none",
    }
    done = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "serve", "--port", "0"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "the migration failed" in done.stderr and "migrating the database failed" in done.stderr
    assert "Traceback" not in done.stderr

"""Database: sessions, transactions, SQLite's settings, aware datetimes on both databases."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.domain import CapsuleStatus
from app.errors import ErrorCode, Unavailable
from app.store import models
from app.store.migrate import upgrade
from app.store.repositories import CapsuleRepository, TeamRepository, capsule_of_team
from app.store.session import Database
from tests.factories import make_capsule, make_team
from tests.system import free_port


async def _scalar(db: Database, sql: str) -> Any:
    async with db.engine.connect() as connection:
        return (await connection.execute(text(sql))).scalar_one()


async def test_datetimes_read_back_aware_in_utc(database: Database) -> None:
    team = await make_team(database)
    # A moment given in another zone comes back as the same instant, in UTC.
    moment = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    capsule = await make_capsule(database, team, created_at=moment)
    assert team.id is not None
    async with database.session() as session:
        stored = await CapsuleRepository(session, team.id).get(capsule.id)
    assert stored is not None
    assert stored.created_at.tzinfo is not None
    assert stored.created_at.utcoffset() == timedelta(0)
    assert stored.created_at == moment
    assert stored.created_at.microsecond == 123456


async def test_transaction_commits_on_success(database: Database) -> None:
    async with database.transaction() as session:
        await TeamRepository(session).add(models.Team(name="kept"))
    async with database.session() as session:
        assert await TeamRepository(session).get_by_name("kept") is not None


async def test_transaction_rolls_back_on_error(database: Database) -> None:
    with pytest.raises(RuntimeError):
        async with database.transaction() as session:
            await TeamRepository(session).add(models.Team(name="dropped"))
            raise RuntimeError("boom")
    async with database.session() as session:
        assert await TeamRepository(session).get_by_name("dropped") is None


async def test_objects_stay_readable_after_commit(database: Database) -> None:
    team = await make_team(database, "readable")
    # expire_on_commit=False: attributes of a committed object need no new query.
    assert team.name == "readable"
    assert team.id is not None


async def test_concurrent_writers_do_not_fail(database: Database) -> None:
    async def write(number: int) -> None:
        for round_ in range(5):
            async with database.transaction() as session:
                # Read, then write in the same transaction: the pattern that upgrades a SQLite lock.
                teams = TeamRepository(session)
                assert await teams.get_by_name(f"writer-{number}-{round_}") is None
                await teams.add(models.Team(name=f"writer-{number}-{round_}"))
                await asyncio.sleep(0)
                await teams.get_by_name("writer-0-0")

    async with asyncio.timeout(30):
        await asyncio.gather(*(write(number) for number in range(8)))
    assert await _scalar(database, "SELECT count(*) FROM team") == 40


async def test_sqlite_settings(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "capsule.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        journal = await _scalar(db, "PRAGMA journal_mode")
        keys = await _scalar(db, "PRAGMA foreign_keys")
        busy = await _scalar(db, "PRAGMA busy_timeout")
    finally:
        await db.dispose()
    assert path.exists()  # the parent directories were created
    assert (journal, keys) == ("wal", 1)
    assert busy >= 5000


async def test_foreign_keys_are_enforced(database: Database) -> None:
    capsule = models.Capsule(id="cap-orphan", team_id=999_999, host_id="h1", status=CapsuleStatus.RUNNING)
    with pytest.raises(Exception, match=r"(?i)foreign key"):
        async with database.transaction() as session:
            session.add(capsule)


async def test_dialect(database: Database, database_url: str) -> None:
    assert database.dialect == database_url.split("+", 1)[0]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres@127.0.0.1:{port}/test",
        "sqlite+aiosqlite:///{directory}",
    ],
    ids=["postgresql-refused", "sqlite-unopenable"],
)
async def test_an_unreachable_database_is_unavailable(url: str, tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"  # where the database file should be
    directory.mkdir()
    db = Database(url.format(port=free_port(), directory=directory))
    try:
        with pytest.raises(Unavailable, match="database cannot be reached; retry") as raised:
            async with db.session() as session:
                await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        assert raised.value.code is ErrorCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            async with db.transaction() as session:
                await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
    finally:
        await db.dispose()


async def test_a_point_read_gives_what_a_session_reads(database: Database) -> None:
    team, other = await make_team(database), await make_team(database)
    capsule = await make_capsule(database, team)
    assert team.id is not None and other.id is not None
    async with database.session() as session:
        stored = await CapsuleRepository(session, team.id).get(capsule.id)
    read = await capsule_of_team(database, team.id, capsule.id)
    assert stored is not None and read is not None
    assert read.to_info() == stored.to_info()
    assert read.created_at.utcoffset() == timedelta(0)
    assert await capsule_of_team(database, other.id, capsule.id) is None  # another team's: none
    assert await capsule_of_team(database, team.id, "cap-missing") is None


def _sqlite_path(db: Database) -> str:
    return str(make_url(db.url).database)


async def test_a_point_read_on_sqlite_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    db = await _sqlite_database(tmp_path)
    try:
        team = await make_team(db)
        capsule = await make_capsule(db, team)
        assert team.id is not None
        writer = sqlite3.connect(_sqlite_path(db), isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE capsule SET status = 'STOPPED' WHERE id = ?", (capsule.id,))
            async with asyncio.timeout(1):  # the write lock is held: the read neither waits nor sees it
                read = await capsule_of_team(db, team.id, capsule.id)
            assert read is not None and read.status is CapsuleStatus.RUNNING
            writer.execute("COMMIT")
        finally:
            writer.close()
        read = await capsule_of_team(db, team.id, capsule.id)
        assert read is not None and read.status is CapsuleStatus.STOPPED
    finally:
        await db.dispose()


async def test_a_point_read_that_would_wait_goes_the_usual_way(tmp_path: Path) -> None:
    db = await _sqlite_database(tmp_path)
    try:
        team = await make_team(db)
        capsule = await make_capsule(db, team)
        assert team.id is not None
        await db.dispose()  # its connections would keep the holder below from its exclusive lock
        # A connection in exclusive locking mode keeps every reader out until it lets go.
        holder = sqlite3.connect(_sqlite_path(db), isolation_level=None, check_same_thread=False)
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE capsule SET status = 'STOPPED' WHERE id = ?", (capsule.id,))

        def let_go() -> None:
            holder.execute("COMMIT")
            holder.close()

        release = threading.Timer(0.3, let_go)
        release.start()
        try:
            async with asyncio.timeout(10):  # the engine's own busy timeout waits for the lock
                read = await capsule_of_team(db, team.id, capsule.id)
        finally:
            release.join()
        assert read is not None and read.status is CapsuleStatus.STOPPED
    finally:
        await db.dispose()


async def _sqlite_database(tmp_path: Path) -> Database:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    await asyncio.to_thread(upgrade, url)
    return Database(url)

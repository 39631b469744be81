"""Database: sessions, transactions, SQLite's settings, aware datetimes on both databases."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from app.domain import CapsuleStatus
from app.errors import ErrorCode, Unavailable
from app.store import health as store_health
from app.store import models
from app.store import session as session_module
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
    threads = set(threading.enumerate())
    try:
        with pytest.raises(Unavailable, match="database cannot be reached; retry") as raised:
            async with db.session() as session:
                await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        assert raised.value.code is ErrorCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            async with db.transaction() as session:
                await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        with pytest.raises(Unavailable, match="database cannot be reached; retry"):
            await capsule_of_team(db, 1, "cap-any")
    finally:
        await db.dispose()
        # aiosqlite stops a connection that failed to open on the connection's own thread, which
        # then hands its result to this loop: that must happen before the test's loop closes.
        for thread in set(threading.enumerate()) - threads:
            if "_connection_worker_thread" in thread.name:
                await asyncio.to_thread(thread.join, 10)


async def test_a_point_read_gives_what_a_session_reads(database: Database) -> None:
    team, other = await make_team(database), await make_team(database)
    capsule = await make_capsule(database, team)
    assert team.id is not None and other.id is not None
    async with database.session() as session:
        stored = await CapsuleRepository(session, team.id).get(capsule.id)
    read = await capsule_of_team(database, team.id, capsule.id)
    assert stored is not None and read is not None
    assert read == stored.to_info()
    assert read.created_at.utcoffset() == timedelta(0)
    assert await capsule_of_team(database, other.id, capsule.id) is None  # another team's: none
    assert await capsule_of_team(database, team.id, "cap-missing") is None


async def test_a_point_read_leaves_its_connection_to_transactions(database: Database) -> None:
    team = await make_team(database)
    capsule = await make_capsule(database, team)
    assert team.id is not None
    before = await capsule_of_team(database, team.id, capsule.id)
    assert before is not None
    later = before.last_active_at + timedelta(hours=1)
    for _ in range(3):
        assert await capsule_of_team(database, team.id, capsule.id) is not None
        # On the connection the read had (one at a time: the pool hands the same one out again), a
        # write that is not committed is rolled back: the read left no autocommit behind.
        async with database.session() as session:
            assert await CapsuleRepository(session, team.id).touch(capsule.id, later)
    after = await capsule_of_team(database, team.id, capsule.id)
    assert after is not None and after.last_active_at == before.last_active_at


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_point_read_outlives_the_server_dropping_its_connections(database: Database) -> None:
    """PostgreSQL's point reads run on the driver's own connections; the server ending them (a
    restart, an administrator) costs the next read a new connection, not an error."""
    team = await make_team(database)
    capsule = await make_capsule(database, team)
    assert team.id is not None
    before = await capsule_of_team(database, team.id, capsule.id)
    async with database.engine.connect() as connection:
        name = (await connection.execute(text("SELECT current_database()"))).scalar_one()
        ended = await connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        assert any(row[0] for row in ended)  # the reader's connection was among them
    for _ in range(3):
        assert await capsule_of_team(database, team.id, capsule.id) == before


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_idle_pooled_connection_the_server_dropped_is_replaced(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled connection that sat idle is pinged before use: one the server ended since (a restart,
    an administrator) is replaced, and the session on it never sees the loss."""
    monkeypatch.setattr(session_module, "PING_IDLE_SEC", 0.0)
    async with database.session() as session:
        name = (await session.exec(text("SELECT current_database()"))).one()[0]  # type: ignore[call-overload]
    admin = await asyncpg.connect(make_url(database.url).set(drivername="postgresql").render_as_string(False))
    try:
        ended = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await admin.close()
    assert any(row[0] for row in ended)  # the pooled connection was among them
    for _ in range(3):
        async with database.transaction() as session:
            assert (await session.exec(text("SELECT 1"))).one()[0] == 1  # type: ignore[call-overload]


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


async def test_the_schema_revision_of_a_store_without_one_is_none(database: Database) -> None:
    """A store with no alembic_version table is at no revision; a lost connection is not that."""
    assert await store_health.current_revisions(database) == frozenset(store_health.head_revisions())
    async with database.transaction() as session:
        await session.exec(text("ALTER TABLE alembic_version RENAME TO alembic_version_kept"))  # type: ignore[call-overload]
    try:
        assert await store_health.current_revisions(database) == frozenset()
    finally:
        async with database.transaction() as session:
            await session.exec(text("ALTER TABLE alembic_version_kept RENAME TO alembic_version"))  # type: ignore[call-overload]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_point_read_connects_as_the_engine_does(database: Database) -> None:
    """The driver's point reader takes the URL's connection arguments as the engine does, less
    those only SQLAlchemy's adapter knows (which the driver would refuse)."""
    team = await make_team(database)
    capsule = await make_capsule(database, team)
    assert team.id is not None
    tuned = Database(f"{database.url}?prepared_statement_cache_size=50&ssl=disable")
    try:
        assert await capsule_of_team(tuned, team.id, capsule.id) == await capsule_of_team(
            database, team.id, capsule.id
        )
    finally:
        await tuned.dispose()


def _statements_by_engine(db: Database) -> tuple[list[list[str]], Any]:
    """The statements each of db.writing_engines runs from now on, and how to stop listening."""
    engines = db.writing_engines
    seen: list[list[str]] = [[] for _ in engines]

    def listener(into: list[str]) -> Any:
        def note(_conn: object, _cursor: object, statement: str, *_: object) -> None:
            into.append(statement)

        return note

    listeners = [listener(into) for into in seen]
    for engine, note in zip(engines, listeners, strict=True):
        event.listen(engine, "before_cursor_execute", note)

    def stop() -> None:
        for engine, note in zip(engines, listeners, strict=True):
            event.remove(engine, "before_cursor_execute", note)

    return seen, stop


async def test_a_write_transaction_commits_or_rolls_back_as_a_transaction_does(database: Database) -> None:
    async with database.write_transaction() as session:
        await TeamRepository(session).add(models.Team(name="written"))
    with pytest.raises(RuntimeError):
        async with database.write_transaction() as session:
            await TeamRepository(session).add(models.Team(name="undone"))
            raise RuntimeError("boom")
    async with database.session() as session:
        assert await TeamRepository(session).get_by_name("written") is not None
        assert await TeamRepository(session).get_by_name("undone") is None


async def test_a_write_transaction_on_sqlite_runs_on_the_loop_writer(tmp_path: Path) -> None:
    db = await _sqlite_database(tmp_path)
    await make_team(db)  # the store is in use, as a server's is once started
    (on_engine, on_loop), stop = _statements_by_engine(db)
    try:
        async with db.write_transaction() as session:
            await TeamRepository(session).add(models.Team(name="on the loop"))
        # The driver runs these on the loop's own thread, in one go (no hop to a thread and back).
        assert on_loop and not on_engine
        assert on_loop[0] == "BEGIN IMMEDIATE"
    finally:
        stop()
        await db.dispose()


async def test_a_write_transaction_waits_for_another_writer_off_the_loop(tmp_path: Path) -> None:
    db = await _sqlite_database(tmp_path)
    await make_team(db)
    holder = sqlite3.connect(_sqlite_path(db), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    (on_engine, on_loop), stop = _statements_by_engine(db)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(tick())
    release.start()
    try:
        async with asyncio.timeout(10), db.write_transaction() as session:
            await TeamRepository(session).add(models.Team(name="after the other"))
        # It waited for the lock on the async engine (its driver's thread); the loop went on.
        assert on_engine and on_loop == ["BEGIN IMMEDIATE"]  # the loop writer's try found it busy
        assert ticks > 5
        async with db.session() as session:
            assert await TeamRepository(session).get_by_name("after the other") is not None
    finally:
        ticking.cancel()
        release.join()
        holder.close()
        stop()
        await db.dispose()


async def test_the_loop_writer_leaves_checkpoints_to_the_async_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "CHECKPOINT_EVERY_COMMITS", 3)
    db = await _sqlite_database(tmp_path)
    (on_engine, _), stop = _statements_by_engine(db)
    try:
        for number in range(3):
            async with db.write_transaction() as session:
                await TeamRepository(session).add(models.Team(name=f"team {number}"))
        async with asyncio.timeout(10):
            while not any("wal_checkpoint" in statement for statement in on_engine):
                await asyncio.sleep(0.01)
    finally:
        stop()
        await db.dispose()

"""Database: the async engine and sessions, for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, Row, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.sql import Executable
from sqlmodel.ext.asyncio.session import AsyncSession

from app.errors import Unavailable

if TYPE_CHECKING:
    from app.store.driver_reader import DriverReader

logger = logging.getLogger(__name__)

UNREACHABLE = "the database cannot be reached; retry"
# What a lost or refused connection raises: the driver's own errors, wrapped or not, and the socket's.
_CONNECTION_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, ConnectionError, TimeoutError)

# How long a SQLite writer waits for the write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections kept open for reuse, and how many more a burst may open (closed again once returned):
# enough that requests in flight at once (20 in the benchmark) do not open and close a connection
# (a thread, for SQLite) each.
POOL_SIZE = 20
MAX_OVERFLOW = 20


def is_sqlite(url: str | URL) -> bool:
    """True for a sqlite URL (any driver)."""
    return make_url(url).get_backend_name() == "sqlite"


def ensure_sqlite_dir(url: str | URL) -> None:
    """Creates the directory of a SQLite file so the first connection can create the file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _set_up_sqlite(dbapi_connection: Any, *, busy_timeout_ms: int, extra: tuple[str, ...] = ()) -> None:
    """The settings of every connection to a SQLite file, then extra pragmas."""
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock another connection may hold.
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # in WAL mode a commit then writes, never syncs
        cursor.execute("PRAGMA foreign_keys = ON")
        for pragma in extra:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    _set_up_sqlite(dbapi_connection, busy_timeout_ms=SQLITE_BUSY_TIMEOUT_MS)


def _sqlite_file(url: str | URL) -> URL | None:
    """The URL of a SQLite file (not an in-memory database), or None for any other store."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed


def create_engine(url: str) -> AsyncEngine:
    """An async engine for the URL, with SQLite set up for several writers in one process."""
    if not is_sqlite(url):
        engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
        event.listen(engine.sync_engine.pool, "checkin", _note_checkin)
        event.listen(engine.sync_engine.pool, "checkout", _ping_if_idle)
        return engine
    ensure_sqlite_dir(url)
    pool: dict[str, Any] = {}
    if _sqlite_file(url) is not None:  # an in-memory database has one connection
        pool = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}
    # The driver's own busy handler also covers the moment before the pragmas run.
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pool)
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


# A pooled server connection unused this long is asked whether it is still alive before it is handed
# out (the server or the network may have dropped it meanwhile); a busy one is not: the ping costs
# the driver three round trips (begin, a query, rollback), on every checkout of every request.
PING_IDLE_SEC = 5.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A connection idle past PING_IDLE_SEC is pinged; a dead one is replaced by a new one."""
    idle_since = record.info.get("checked_in_at")
    if idle_since is None or time.monotonic() - idle_since < PING_IDLE_SEC:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:  # the pool tries a new connection in its place
        raise sa_exc.DisconnectionError(f"a pooled connection is gone: {type(exc).__name__}") from exc


def _point_reader_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # Never wait: a read that would (rare in WAL mode) goes through the async engine instead.
        cursor.execute("PRAGMA busy_timeout = 0")
        cursor.execute("PRAGMA query_only = ON")
    finally:
        cursor.close()


def _point_reader(url: str) -> Engine | None:
    """For a SQLite file, a synchronous engine whose reads run on the event loop itself.

    A point read of an indexed row takes SQLite some 20 us. Through aiosqlite it costs six hops to
    its thread and back (cursor, execute, fetch, close, two rollbacks), some 600 us of CPU, on every
    request that looks its capsule up. In WAL mode a reader takes no lock a writer holds, so the
    read does not wait; when it would, it fails at once and the caller reads the usual way.
    """
    parsed = _sqlite_file(url)
    if parsed is None:
        return None
    engine = sa.create_engine(parsed.set(drivername="sqlite"), pool_size=1, max_overflow=0)
    event.listen(engine, "connect", _point_reader_on_connect)
    return engine


def _loop_writer_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver begins nothing: _begin_immediate does
    # Never wait on the loop: a writer that finds the lock taken writes the usual way instead. A
    # checkpoint syncs the file: it runs on a thread of the async engine (Database._checkpoint).
    _set_up_sqlite(dbapi_connection, busy_timeout_ms=0, extra=("PRAGMA wal_autocheckpoint = 0",))


def _begin_immediate(connection: sa.Connection) -> None:
    # The write lock up front: once BEGIN IMMEDIATE holds it, no statement of the transaction and not
    # its commit can find the database busy in WAL mode.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _loop_writer(url: str) -> Engine | None:
    """For a SQLite file, a synchronous engine whose write transactions run on the event loop itself.

    A transaction of the record writer (a few updates and inserts, SQLite some 20 us each) goes
    through aiosqlite as four hops to its thread and back per statement, each of which waits for the
    loop's turn: under load a batch of ten writes took 35-45 ms, most of it waiting, and the writes
    of every request waited for it in turn. On the loop it takes its CPU time alone. It never waits
    for a lock: where another connection writes, the transaction goes through the async engine.
    """
    parsed = _sqlite_file(url)
    if parsed is None:
        return None
    engine = sa.create_engine(parsed.set(drivername="sqlite"), pool_size=1, max_overflow=0)
    event.listen(engine, "connect", _loop_writer_on_connect)
    event.listen(engine, "begin", _begin_immediate)
    return engine


class LoopSession(AsyncSession):
    """An AsyncSession over a synchronous connection: each call runs at once, on the loop.

    exec and execute run the statement themselves (AsyncSession's would expect the async driver's
    cursor); the rest of AsyncSession runs through greenlets as usual, which a synchronous driver
    never leaves.
    """

    def __init__(self, *, bind: sa.Connection) -> None:
        super().__init__(expire_on_commit=False)
        self.sync_session.bind = bind  # its statements join the connection's transaction

    async def exec(self, statement: Any, **options: Any) -> Any:
        return self.sync_session.exec(statement, **options)

    async def execute(self, statement: Any, *args: Any, **options: Any) -> Any:
        return self.sync_session.execute(statement, *args, **options)


# The loop writer's commits between two checkpoints of the write-ahead log (each commit adds a few
# pages; SQLite's own automatic checkpoint comes at 1000 pages).
CHECKPOINT_EVERY_COMMITS = 200


class Database:
    """The engine and session factory of one database; built once per process and passed down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        self._reader = _point_reader(url)
        self._writer = _loop_writer(url)
        self._writer_busy = False
        self._commits_unchecked = 0
        self._checkpointing: asyncio.Task[None] | None = None
        parsed = make_url(url)
        self._driver_reader: DriverReader | None = None
        if parsed.get_backend_name() == "postgresql":  # the embedded default loads no server driver
            from app.store.driver_reader import DriverReader

            self._driver_reader = DriverReader(parsed, self.engine.dialect)

    async def point_read(self, statement: Executable, params: dict[str, Any]) -> Row[Any] | None:
        """The one row (or None) a query of a primary or unique key selects; on a SQLite file read
        on the event loop, without a thread hop; on PostgreSQL through the driver's own pool."""
        rows = await self.short_read(statement, params)
        return rows[0] if rows else None

    async def short_read(self, statement: Executable, params: dict[str, Any]) -> Sequence[Row[Any]]:
        """Every row of a short indexed read (a page of a few hundred rows at most), read outside
        any transaction as point_read reads: one round trip on PostgreSQL, none on a SQLite file."""
        if self._driver_reader is not None:
            try:
                rows: list[Row[Any]] = await self._driver_reader.read_all(statement, params)
                return rows
            except self._driver_reader.connection_errors as exc:
                logger.warning("database unreachable: %s", type(exc).__name__)
                raise Unavailable(UNREACHABLE) from exc
        if self._reader is not None:
            try:
                with self._reader.connect() as connection:
                    return connection.execute(statement, params).all()
            except sa_exc.OperationalError:  # busy, or the file is not there yet: the usual way
                pass
        try:
            async with self.engine.connect() as connection:  # SQLite's: in memory, or a busy file
                return (await connection.execute(statement, params)).all()
        except _CONNECTION_ERRORS as exc:
            logger.warning("database unreachable: %s", type(exc).__name__)
            raise Unavailable(UNREACHABLE) from exc

    @property
    def writing_engines(self) -> list[Engine]:
        """The engines whose statements may write, as SQLAlchemy's events see them: the async
        engine's, and on a SQLite file the loop's writer (the point reader only reads)."""
        return [self.engine.sync_engine, *([self._writer] if self._writer is not None else [])]

    @property
    def dialect(self) -> str:
        """The backend's name: sqlite or postgresql."""
        return self.engine.dialect.name

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session; the caller commits (uncommitted work is rolled back on close)."""
        try:
            async with self._sessions() as session:
                yield session
        except _CONNECTION_ERRORS as exc:
            logger.warning("database unreachable: %s", type(exc).__name__)
            raise Unavailable(UNREACHABLE) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: commits on success, rolls back on error."""
        try:
            async with self._sessions() as session, session.begin():
                yield session
        except _CONNECTION_ERRORS as exc:
            logger.warning("database unreachable: %s", type(exc).__name__)
            raise Unavailable(UNREACHABLE) from exc

    @asynccontextmanager
    async def write_transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one write transaction, as transaction() gives: on a SQLite file, run on
        the event loop itself while no other connection holds the write lock (see _loop_writer);
        the caller runs one at a time."""
        connection = self._begin_on_loop()
        if connection is None:
            async with self.transaction() as session:
                yield session
            return
        session = LoopSession(bind=connection)
        try:
            try:
                yield session
            except BaseException:
                connection.rollback()
                raise
            try:
                await session.flush()  # what the session holds goes in, as transaction()'s commit does
                connection.commit()
            except _CONNECTION_ERRORS as exc:
                logger.warning("database unreachable: %s", type(exc).__name__)
                raise Unavailable(UNREACHABLE) from exc
        finally:
            await session.close()
            connection.close()
            self._writer_busy = False
        self._commits_unchecked += 1
        if self._commits_unchecked >= CHECKPOINT_EVERY_COMMITS and (
            self._checkpointing is None or self._checkpointing.done()
        ):
            self._commits_unchecked = 0
            self._checkpointing = asyncio.create_task(self._checkpoint(), name="sqlite-checkpoint")

    def _begin_on_loop(self) -> sa.Connection | None:
        """The loop writer's connection inside BEGIN IMMEDIATE, or None: no loop writer, in use, or
        another connection holds the write lock."""
        if self._writer is None or self._writer_busy:
            return None
        try:
            connection = self._writer.connect()
        except sa_exc.OperationalError:  # the file is not there yet
            return None
        try:
            connection.begin()
        except sa_exc.OperationalError:  # busy: another connection writes
            connection.close()
            return None
        self._writer_busy = True
        return connection

    async def _checkpoint(self) -> None:
        """Moves the write-ahead log into the database file, on a thread of the async engine."""
        try:
            async with self.engine.connect() as connection:
                await connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # the next one catches up
            logger.warning("a checkpoint of the SQLite write-ahead log failed: %s", exc)

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._writer is not None:
            self._writer.dispose()
        if self._reader is not None:
            self._reader.dispose()
        if self._driver_reader is not None:
            await self._driver_reader.close()
        await self.engine.dispose()

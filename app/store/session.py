"""Database: the async engine and sessions, for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
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


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock another connection may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine for the URL, with SQLite set up for several writers in one process."""
    if not is_sqlite(url):
        engine = create_async_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
        event.listen(engine.sync_engine.pool, "checkin", _note_checkin)
        event.listen(engine.sync_engine.pool, "checkout", _ping_if_idle)
        return engine
    ensure_sqlite_dir(url)
    pool: dict[str, Any] = {}
    if make_url(url).database not in (None, "", ":memory:"):  # an in-memory database has one connection
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
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    engine = sa.create_engine(parsed.set(drivername="sqlite"), pool_size=1, max_overflow=0)
    event.listen(engine, "connect", _point_reader_on_connect)
    return engine


class Database:
    """The engine and session factory of one database; built once per process and passed down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)
        self._reader = _point_reader(url)
        parsed = make_url(url)
        self._driver_reader: DriverReader | None = None
        if parsed.get_backend_name() == "postgresql":  # the embedded default loads no server driver
            from app.store.driver_reader import DriverReader

            self._driver_reader = DriverReader(parsed, self.engine.dialect)

    async def point_read(self, statement: Executable, params: dict[str, Any]) -> Row[Any] | None:
        """The one row (or None) a query of a primary or unique key selects; on a SQLite file read
        on the event loop, without a thread hop; on PostgreSQL through the driver's own pool."""
        if self._driver_reader is not None:
            try:
                row: Row[Any] | None = await self._driver_reader.read(statement, params)
            except self._driver_reader.connection_errors as exc:
                logger.warning("database unreachable: %s", type(exc).__name__)
                raise Unavailable(UNREACHABLE) from exc
            return row
        if self._reader is not None:
            try:
                with self._reader.connect() as connection:
                    return connection.execute(statement, params).one_or_none()
            except sa_exc.OperationalError:  # busy, or the file is not there yet: the usual way
                pass
        try:
            async with self.engine.connect() as connection:  # SQLite's: in memory, or a busy file
                return (await connection.execute(statement, params)).one_or_none()
        except _CONNECTION_ERRORS as exc:
            logger.warning("database unreachable: %s", type(exc).__name__)
            raise Unavailable(UNREACHABLE) from exc

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

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        if self._reader is not None:
            self._reader.dispose()
        if self._driver_reader is not None:
            await self._driver_reader.close()
        await self.engine.dispose()

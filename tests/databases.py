"""Test databases on PostgreSQL: a migrated template per test run, and a fresh clone of it per test.

CREATE DATABASE ... TEMPLATE takes about a quarter of a second (it syncs the new files to disk),
so clones are made ahead, on a thread and event loop of their own, while the previous test runs;
drops happen there too. Every database is named capsule_test_<pid>_..., so a run tells its own
from those of other runs and drops those that a killed run left behind.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections import deque
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

T = TypeVar("T")

ADMIN_URL = os.environ.get("CAPSULE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
DB_PREFIX = "capsule_test_"
CLONES_AHEAD = 2


def database_url(name: str) -> str:
    """The SQLAlchemy (asyncpg) URL of one database on the test server."""
    url = make_url(ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


async def connect_admin() -> asyncpg.Connection:
    """A connection for CREATE and DROP DATABASE; fails the test (never skips) when there is no server."""
    dsn = make_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL at {ADMIN_URL} is unreachable ({exc!r}); start it, or set "
            "CAPSULE_TEST_POSTGRES_URL: the postgresql tests never skip",
            pytrace=False,
        )


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    pid = name.removeprefix(DB_PREFIX).split("_", 1)[0]
    return int(pid) if name.startswith(DB_PREFIX) and pid.isdigit() else None


def _drop(name: str) -> list[str]:
    # A template must stop being one before it can be dropped; FORCE ends open connections.
    return [f'ALTER DATABASE "{name}" IS_TEMPLATE false', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)']


class Clones:
    """Makes the template database and hands out fresh clones of it, one test at a time."""

    def __init__(self) -> None:
        self.template = f"{DB_PREFIX}{os.getpid()}_template"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-clones", daemon=True)
        self._thread.start()
        self._connection: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._ready: deque[Future[str]] = deque()
        self._dropping: list[Future[None]] = []

    def _run(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    async def _execute(self, *statements: str) -> None:
        async with self._lock:  # one admin connection runs one statement at a time
            if self._connection is None:
                self._connection = await connect_admin()
            for statement in statements:
                await self._connection.execute(statement)

    async def _drop_leftovers(self) -> None:
        async with self._lock:
            if self._connection is None:
                self._connection = await connect_admin()
            names = [row[0] for row in await self._connection.fetch("SELECT datname FROM pg_database")]
        for name in names:
            pid = _owner_pid(name)
            if pid is not None and (pid == os.getpid() or not _is_alive(pid)):
                await self._execute(*_drop(name))

    def create_template(self) -> str:
        """Drops what killed runs left, then makes an empty template database; returns its name."""
        self._run(self._drop_leftovers()).result()
        self._run(self._execute(f'CREATE DATABASE "{self.template}"')).result()
        return self.template

    def seal_template(self) -> None:
        """Marks the migrated template as one, and starts cloning it ahead of the tests."""
        self._run(self._execute(f'ALTER DATABASE "{self.template}" IS_TEMPLATE true')).result()
        for _ in range(CLONES_AHEAD):
            self._ready.append(self._run(self._clone()))

    async def _clone(self) -> str:
        name = f"{DB_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
        await self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def take(self) -> str:
        """A fresh clone for one test (waits for the oldest one in the making)."""
        self._ready.append(self._run(self._clone()))
        return self._ready.popleft().result(timeout=120)

    def give_back(self, name: str) -> None:
        """Drops a test's clone, without waiting."""
        self._dropping.append(self._run(self._execute(*_drop(name))))

    def close(self) -> None:
        """Drops every clone and the template, then stops the thread."""
        try:
            if self._connection is None:  # the server was never reached: nothing to drop
                return
            for ready in self._ready:
                try:
                    self.give_back(ready.result(timeout=120))
                except BaseException:  # a clone that failed to appear has nothing to drop
                    continue
            for dropping in self._dropping:
                dropping.result(timeout=120)
            self._run(self._execute(*_drop(self.template))).result(timeout=120)
            if self._connection is not None:
                self._run(self._connection.close()).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

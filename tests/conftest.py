"""Shared database fixtures: a fresh, migrated, empty database per test, on SQLite and PostgreSQL.

Migrations run once per test run into a template (a SQLite file, a PostgreSQL template database,
see tests/databases.py); each test gets its own copy. When PostgreSQL cannot be reached the
postgresql tests fail: they never skip.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from app.store.migrate import upgrade
from app.store.session import Database
from tests import databases

T = TypeVar("T")

TESTS = Path(__file__).resolve().parent
# Test folders whose agents name their capsules themselves (c1, doomed, ...): a check that a capsule's
# process is gone looks for that name host-wide, so these files run one after another on one worker.
# Every other file runs whole on one worker (its module fixtures set up once), beside them.
FIXED_CAPSULE_IDS = {"agent", "cli", "hosts"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups the tests for pytest-xdist's loadgroup scheduling (see pyproject.toml's addopts)."""
    for item in items:
        path = item.path.resolve().relative_to(TESTS)
        group = "fixed-capsule-ids" if path.parts[0] in FIXED_CAPSULE_IDS else str(path)
        item.add_marker(pytest.mark.xdist_group(group))


def _in_thread(work: Callable[[], T]) -> T:
    """Runs blocking work that calls asyncio.run (alembic's env.py does) clear of pytest-asyncio's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head, copied by every sqlite test."""
    path = tmp_path_factory.mktemp("template") / "capsule.db"
    _in_thread(lambda: upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_clones() -> Iterator[databases.Clones]:
    """A PostgreSQL template database migrated to head, and clones of it made ahead of the tests."""
    clones = databases.Clones()
    try:
        template = clones.create_template()
        _in_thread(lambda: upgrade(databases.database_url(template)))
        clones.seal_template()
        yield clones
    finally:
        clones.close()


def fresh_database(request: pytest.FixtureRequest, directory: Path) -> Iterator[str]:
    """The URL of a fresh, migrated, empty database of request.param's kind (a SQLite file in
    directory, or a PostgreSQL clone), for a fixture of any scope to yield from."""
    if request.param == "sqlite":
        path = directory / "capsule.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    clones: databases.Clones = request.getfixturevalue("postgres_clones")
    name = clones.take()
    try:
        yield databases.database_url(name)
    finally:
        clones.give_back(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, migrated, empty database of the parametrised kind."""
    yield from fresh_database(request, tmp_path)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A connected Database on the fresh database; disposed after the test."""
    db = Database(database_url)
    try:
        yield db
    finally:
        await db.dispose()

"""Alembic environment: runs migrations on an async engine (aiosqlite or asyncpg).

The URL comes from code (`app.store.migrate.upgrade` puts it in `config.attributes`) or, on the
alembic command line, from `-x url=...`; never from alembic.ini.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from app.store import models
from app.store.session import ensure_sqlite_dir

config = context.config
target_metadata = SQLModel.metadata


def _database_url() -> str:
    url = config.attributes.get("database_url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=sqlite+aiosqlite:///path/capsule.db ...")
    return str(url)


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Our own column type renders by its name, imported in script.py.mako.
    if type_ == "type" and isinstance(obj, models.UTCDateTime):
        return "UTCDateTime()"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        # Batch mode everywhere: SQLite rebuilds tables for ALTERs, PostgreSQL alters in place.
        render_as_batch=True,
        render_item=_render_item,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Writes the SQL for the migrations instead of running them."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    """Runs the migrations on one connection of a throwaway engine."""
    url = _database_url()
    ensure_sqlite_dir(url)
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


# Code that calls alembic has set up logging already; only the command line needs this.
if config.config_file_name is not None and not config.attributes.get("database_url"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())

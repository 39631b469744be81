"""Applies the alembic migrations; `capsule migrate` and `capsule serve` call this."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

import app

logger = logging.getLogger(__name__)

# The package is installed editable, so alembic.ini and alembic/ sit beside it in the repository.
PROJECT_ROOT = Path(app.__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    """Alembic's Config for this project, with the URL handed over in code (not through the ini)."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrates the database to `revision` (head by default); blocking, so async code uses to_thread."""
    logger.info("migrating the database to %s", revision)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Migrates the database back to `revision` ("base" empties it)."""
    logger.info("migrating the database back to %s", revision)
    command.downgrade(alembic_config(database_url), revision)

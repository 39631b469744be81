"""Applies the alembic migrations; `capsule migrate` and `capsule serve` call this.

Alembic is imported only where a migration runs: it costs a process 12 MB, which a server would
carry for its whole life after a migration of a second. `capsule serve` migrates in a child process
(upgrade_in_child) and tells whether its store is current from the migration files themselves.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import app

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

# The package is installed editable, so alembic.ini and alembic/ sit beside it in the repository.
PROJECT_ROOT = Path(app.__file__).resolve().parent.parent
VERSIONS = PROJECT_ROOT / "alembic" / "versions"


def alembic_config(database_url: str) -> Config:
    """Alembic's Config for this project, with the URL handed over in code (not through the ini)."""
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrates the database to `revision` (head by default); blocking, so async code uses to_thread."""
    from alembic import command

    logger.info("migrating the database to %s", revision)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Migrates the database back to `revision` ("base" empties it)."""
    from alembic import command

    logger.info("migrating the database back to %s", revision)
    command.downgrade(alembic_config(database_url), revision)


class MigrationFailed(RuntimeError):
    """The migration in a child process did not succeed; the child has said why on stderr."""


def upgrade_in_child(database_url: str) -> None:
    """upgrade() in a forked child, so that this process never loads alembic; raises MigrationFailed.

    Forking is safe only before any thread runs: with one running, this migrates in this process.
    """
    if threading.active_count() > 1:
        upgrade(database_url)
        return
    _in_child(lambda: upgrade(database_url))


def _in_child(work: Callable[[], None]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it ends here
        code = 1
        try:
            work()
            code = 0
        except BaseException as exc:  # the parent learns of it from the exit code
            logger.debug("migration failed", exc_info=True)
            print(f"capsule: the migration failed: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise MigrationFailed(f"migrating the database failed (the migration process exited with {code})")


def head_revisions() -> frozenset[str]:
    """The revisions the migrations in this package lead to (what a current store is at), read from
    their files' revision and down_revision, as alembic reads them."""
    revisions: set[str] = set()
    below: set[str] = set()
    for path in VERSIONS.glob("*.py"):
        found = _revision_fields(path)
        if "revision" not in found:
            continue
        revisions.add(str(found["revision"]))
        down = found.get("down_revision")
        if isinstance(down, str):
            below.add(down)
        elif isinstance(down, (tuple, list)):  # a merge revision
            below.update(str(each) for each in down)
    return frozenset(revisions - below)


def _revision_fields(path: Path) -> dict[str, object]:
    fields: dict[str, object] = {}
    for node in ast.parse(path.read_text()).body:
        target: ast.expr | None = None
        if isinstance(node, ast.AnnAssign):
            target = node.target
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision") and value is not None:
            fields[target.id] = ast.literal_eval(value)
    return fields

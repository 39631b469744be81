"""The `capsule` console script's commands, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.services.hosts import HostService
from app.services.keys import KeyService
from app.store.session import Database
from tests.system import command_env

CAPSULE = Path(sys.executable).parent / "capsule"


def run(tmp_path: Path, database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = command_env()
    environment |= {"CAPSULE_DATA_DIR": str(tmp_path / "data"), "CAPSULE_DATABASE_URL": database_url, **env}
    return subprocess.run(
        [str(CAPSULE), *args], env=environment, capture_output=True, text=True, timeout=60, check=False
    )


async def test_migrate_keys_and_hosts(tmp_path: Path, database_url: str) -> None:
    migrated = run(tmp_path, database_url, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    created = run(tmp_path, database_url, "keys", "create", "--team", "ops")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("cap_")
    added = run(tmp_path, database_url, "hosts", "add", "h7", "agent-7.internal:7070")
    assert added.returncode == 0, added.stderr
    db = Database(database_url)
    try:
        team = await KeyService(db).authenticate(key)
        assert team is not None and team.name == "ops"
        assert await HostService(db, {}).hosts() == {"h7": "agent-7.internal:7070"}
    finally:
        await db.dispose()


def test_bad_input_is_a_line_not_a_traceback(tmp_path: Path, database_url: str) -> None:
    bad_address = run(tmp_path, database_url, "hosts", "add", "h1", "no-port-here")
    assert bad_address.returncode != 0
    assert "Traceback" not in bad_address.stderr and "HOST:PORT" in bad_address.stderr
    bad_env = run(tmp_path, database_url, "migrate", CAPSULE_HOSTS="nonsense")
    assert bad_env.returncode == 2 and "CAPSULE_HOSTS" in bad_env.stderr
    bad_bus = run(tmp_path, database_url, "migrate", CAPSULE_BUS_URL="kafka://x")
    assert bad_bus.returncode == 2 and "CAPSULE_BUS_URL" in bad_bus.stderr

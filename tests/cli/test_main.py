"""The `capsule` console script's commands, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.services.hosts import HostService
from app.services.keys import SHOWN_PREFIX_LEN, KeyService, hash_key
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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the service tests cover both stores
async def test_keys_list_and_revoke(tmp_path: Path, database_url: str) -> None:
    keys = [run(tmp_path, database_url, "keys", "create", "--team", "ops") for _ in range(2)]
    assert all(k.returncode == 0 for k in keys), [k.stderr for k in keys]
    first, second = (k.stdout.strip() for k in keys)
    assert first not in keys[0].stderr  # the log says which key, never the key

    listed = run(tmp_path, database_url, "keys", "list", "--team", "ops")
    assert listed.returncode == 0, listed.stderr
    header, *rows = (line.split() for line in listed.stdout.splitlines())
    assert header == ["ID", "PREFIX", "CREATED", "REVOKED"]
    assert [row[1] for row in rows] == [first[:SHOWN_PREFIX_LEN], second[:SHOWN_PREFIX_LEN]]
    assert [row[3] for row in rows] == ["-", "-"]
    for secret in (first, second, hash_key(first), hash_key(second)):
        assert secret not in listed.stdout + listed.stderr

    key_id = rows[0][0]
    revoked = run(tmp_path, database_url, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"revoked API key {key_id} ({first[:SHOWN_PREFIX_LEN]}...) of team ops"
    relisted = run(tmp_path, database_url, "keys", "list", "--team", "ops")
    revoked_column = [line.split()[3] for line in relisted.stdout.splitlines()[1:]]
    assert revoked_column[0] != "-" and revoked_column[1] == "-"

    db = Database(database_url)
    try:
        keys_service = KeyService(db)
        assert await keys_service.authenticate(first) is None
        assert await keys_service.authenticate(second) is not None
    finally:
        await db.dispose()

    unknown = run(tmp_path, database_url, "keys", "revoke", "999")
    assert unknown.returncode == 1 and "no API key 999" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_bad_input_is_a_line_not_a_traceback(tmp_path: Path, database_url: str) -> None:
    bad_address = run(tmp_path, database_url, "hosts", "add", "h1", "no-port-here")
    assert bad_address.returncode != 0
    assert "Traceback" not in bad_address.stderr and "HOST:PORT" in bad_address.stderr
    bad_env = run(tmp_path, database_url, "migrate", CAPSULE_HOSTS="nonsense")
    assert bad_env.returncode == 2 and "CAPSULE_HOSTS" in bad_env.stderr
    bad_bus = run(tmp_path, database_url, "migrate", CAPSULE_BUS_URL="kafka://x")
    assert bad_bus.returncode == 2 and "CAPSULE_BUS_URL" in bad_bus.stderr

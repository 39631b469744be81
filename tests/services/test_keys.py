"""KeyService: keys shown once and stored hashed, authentication, revocation, the development key."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from sqlalchemy import text

from app.services.keys import KeyService, hash_key
from app.store.session import Database


async def _dump(database: Database) -> str:
    """Every row of the key and team tables, as text."""
    async with database.engine.connect() as connection:
        keys = (await connection.execute(text("SELECT * FROM api_key"))).all()
        teams = (await connection.execute(text("SELECT * FROM team"))).all()
    return repr(keys) + repr(teams)


class TestCreateKey:
    async def test_valid(self, database: Database) -> None:
        keys = KeyService(database)
        team, key = await keys.create_key("acme")
        assert team.name == "acme" and team.id is not None
        assert key.startswith("cap_") and len(key) == 47
        authenticated = await keys.authenticate(key)
        assert authenticated is not None and authenticated.id == team.id

    async def test_only_the_hash_is_stored(self, database: Database) -> None:
        _, key = await KeyService(database).create_key("acme")
        stored = await _dump(database)
        assert key not in stored
        assert key[4:] not in stored
        assert hash_key(key) in stored

    async def test_reuses_the_team(self, database: Database) -> None:
        keys = KeyService(database)
        first, key_one = await keys.create_key("acme")
        second, key_two = await keys.create_key("acme")
        assert first.id == second.id and key_one != key_two

    async def test_concurrent_creations_share_one_team(self, database: Database) -> None:
        keys = KeyService(database)
        async with asyncio.timeout(30):
            created = await asyncio.gather(*(keys.create_key("racing") for _ in range(5)))
        assert len({team.id for team, _ in created}) == 1
        assert len({key for _, key in created}) == 5


class TestAuthenticate:
    async def test_unknown_and_malformed(self, database: Database) -> None:
        keys = KeyService(database)
        await keys.create_key("acme")
        assert await keys.authenticate("cap_" + "A" * 43) is None
        for malformed in ("", "cap_", "Bearer x", "cap_short", "cap_" + "A" * 44, "x" * 10_000):
            assert await keys.authenticate(malformed) is None

    async def test_revoked(self, database: Database) -> None:
        keys = KeyService(database)
        _, key = await keys.create_key("acme")
        _, other = await keys.create_key("acme")
        assert await keys.revoke(key) is True
        assert await keys.revoke(key) is False
        assert await keys.revoke("cap_" + "B" * 43) is False
        assert await keys.authenticate(key) is None
        assert await keys.authenticate(other) is not None  # the team's other keys still work


class TestEnsureDevKey:
    async def test_first_start_creates_and_later_starts_reuse(
        self, database: Database, tmp_path: Path
    ) -> None:
        data_dir = tmp_path / "data"
        keys = KeyService(database)
        key, created = await keys.ensure_dev_key(data_dir)
        path = data_dir / "dev-api-key"
        assert created is True
        assert path.read_text().strip() == key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        team = await keys.authenticate(key)
        assert team is not None and team.name == "default"
        assert await keys.ensure_dev_key(data_dir) == (key, False)

    async def test_a_revoked_dev_key_is_replaced(self, database: Database, tmp_path: Path) -> None:
        keys = KeyService(database)
        key, _ = await keys.ensure_dev_key(tmp_path)
        await keys.revoke(key)
        new_key, created = await keys.ensure_dev_key(tmp_path)
        assert created is True and new_key != key
        assert (tmp_path / "dev-api-key").read_text().strip() == new_key

    async def test_a_key_from_another_database_is_replaced(self, database: Database, tmp_path: Path) -> None:
        (tmp_path / "dev-api-key").write_text("cap_" + "C" * 43 + "\n")
        key, created = await KeyService(database).ensure_dev_key(tmp_path)
        assert created is True and key != "cap_" + "C" * 43

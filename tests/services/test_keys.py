"""KeyService: keys shown once and stored hashed, authentication in constant time, listing, revocation
(announced on the bus), the development key."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from app.bus.broadcast import Bus
from app.bus.events import KEY_REVOKED_CHANNEL, key_revoked_from_json
from app.errors import NotFound
from app.services.keys import SHOWN_PREFIX_LEN, KeyService, hash_key
from app.store import models
from app.store.repositories import ApiKeyRepository
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


class TestCredential:
    async def test_names_the_key_and_its_team(self, database: Database) -> None:
        keys = KeyService(database)
        team, key = await keys.create_key("acme")
        _, other = await keys.create_key("acme")
        first, second = await keys.credential(key), await keys.credential(other)
        assert first is not None and second is not None
        assert first.team == second.team == team and first.key_id != second.key_id

    async def test_a_shared_prefix_is_told_apart_by_the_hash(self, database: Database) -> None:
        keys = KeyService(database)
        team, key = await keys.create_key("acme")
        # A forged key with the real one's prefix, and a stored key with that prefix too.
        forged = (
            key[:SHOWN_PREFIX_LEN]
            + ("A" if key[SHOWN_PREFIX_LEN] != "A" else "B")
            + key[SHOWN_PREFIX_LEN + 1 :]
        )
        async with database.transaction() as session:
            await ApiKeyRepository(session).add(
                models.ApiKey(
                    team_id=team.id, key_hash=hash_key("cap_" + "Z" * 43), prefix=key[:SHOWN_PREFIX_LEN]
                )
            )
        assert await keys.credential(forged) is None
        found = await keys.credential(key)
        assert found is not None and found.team == team


class TestListKeys:
    async def test_ids_prefixes_and_revocations_never_the_key(self, database: Database) -> None:
        keys = KeyService(database)
        _, first = await keys.create_key("acme")
        _, second = await keys.create_key("acme")
        await keys.create_key("other-team")
        await keys.revoke(first)
        listed = await keys.list_keys("acme")
        assert [k.prefix for k in listed] == [first[:SHOWN_PREFIX_LEN], second[:SHOWN_PREFIX_LEN]]
        assert [k.is_revoked for k in listed] == [True, False]
        assert {k.team for k in listed} == {"acme"}
        assert listed[0].revoked_at is not None and listed[0].revoked_at >= listed[0].created_at
        assert first not in repr(listed) and hash_key(first) not in repr(listed)

    async def test_unknown_team(self, database: Database) -> None:
        with pytest.raises(NotFound, match="no team 'nobody'"):
            await KeyService(database).list_keys("nobody")


class TestRevokeId:
    async def test_revokes_once_and_announces_it(self, database: Database) -> None:
        bus = Bus("memory://")
        await bus.connect()
        try:
            keys = KeyService(database, bus=bus)
            _, key = await keys.create_key("acme")
            _, other = await keys.create_key("acme")
            credential = await keys.credential(key)
            assert credential is not None
            async with bus.subscribe(KEY_REVOKED_CHANNEL) as messages:
                info, changed = await keys.revoke_id(credential.key_id)
                async with asyncio.timeout(5):
                    announced = await anext(aiter(messages))
            assert key_revoked_from_json(announced) == credential.key_id
            assert changed is True and info.is_revoked and info.team == "acme"
            again, changed = await keys.revoke_id(credential.key_id)
            assert changed is False and again.revoked_at == info.revoked_at
            assert await keys.authenticate(key) is None
            assert await keys.authenticate(other) is not None
            assert await keys.revoked_among([credential.key_id, credential.key_id + 1]) == {credential.key_id}
        finally:
            await bus.disconnect()

    async def test_unknown_id(self, database: Database) -> None:
        with pytest.raises(NotFound, match="no API key 4242"):
            await KeyService(database).revoke_id(4242)


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

"""HostService: registration, CAPSULE_HOSTS merged over the store, choosing a host."""

from __future__ import annotations

import pytest

from app.domain import CapsuleStatus
from app.errors import HostUnavailable, InvalidRequest
from app.services.hosts import HostService
from app.store.session import Database
from tests.factories import make_capsule, make_team


class TestRegister:
    async def test_valid_and_moved(self, database: Database) -> None:
        hosts = HostService(database, {})
        await hosts.register("h1", "agent-1.internal:7070")
        await hosts.register("h2", "[::1]:7071")
        await hosts.register("h1", "127.0.0.1:7072")
        assert await hosts.hosts() == {"h1": "127.0.0.1:7072", "h2": "[::1]:7071"}
        assert await hosts.address("h2") == "[::1]:7071"
        assert await hosts.address("h9") is None

    @pytest.mark.parametrize(
        "address",
        ["", "agent", "agent:", ":7070", "agent:0", "agent:70000", "agent:port", "a b:1", "::1:7070"],
    )
    async def test_bad_address(self, database: Database, address: str) -> None:
        with pytest.raises(InvalidRequest):
            await HostService(database, {}).register("h1", address)

    @pytest.mark.parametrize("host_id", ["", "-h", "h 1", "h" * 65])
    async def test_bad_id(self, database: Database, host_id: str) -> None:
        with pytest.raises(InvalidRequest):
            await HostService(database, {}).register(host_id, "127.0.0.1:7070")


class TestHosts:
    async def test_configured_wins_over_stored(self, database: Database) -> None:
        hosts = HostService(database, {"h1": "configured:7070", "h3": "other:7070"})
        await hosts.register("h1", "stored:7070")
        await hosts.register("h2", "stored:7071")
        assert await hosts.hosts() == {"h1": "configured:7070", "h2": "stored:7071", "h3": "other:7070"}
        assert await hosts.address("h1") == "configured:7070"


class TestChoose:
    async def test_no_host(self, database: Database) -> None:
        with pytest.raises(HostUnavailable, match="no host agent is registered"):
            await HostService(database, {}).choose()

    async def test_fewest_active_capsules(self, database: Database) -> None:
        hosts = HostService(database, {"h1": "a:1", "h2": "b:2"})
        await hosts.register("h3", "c:3")
        team = await make_team(database)
        for host_id in ("h1", "h1", "h2", "h3"):
            await make_capsule(database, team, host_id=host_id)
        for _ in range(3):  # stopped capsules take no share
            await make_capsule(database, team, host_id="h2", status=CapsuleStatus.STOPPED)
        await make_capsule(database, team, host_id="h3", status=CapsuleStatus.STARTING)
        assert await hosts.choose() == "h2"

    async def test_ties_go_to_the_lowest_id(self, database: Database) -> None:
        assert await HostService(database, {"b": "b:1", "a": "a:1"}).choose() == "a"

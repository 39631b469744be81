"""TeamLimits: the moving window of operations, and slots in memory and in Redis (leases that a
replica renews, and that run out when it dies); the settings they read."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as redis

from app.config import ConfigError, Settings
from app.errors import RateLimited
from app.services.limits import TeamLimits

REDIS_URL = "redis://127.0.0.1:6379"
LEASE_SEC = 1.5


def fresh_settings(**fields: object) -> Settings:
    """Settings whose limits share nothing in Redis with any other test's (a database of their own)."""
    return Settings(database_url=f"sqlite+aiosqlite:///{uuid.uuid4().hex}.db", **fields)  # type: ignore[arg-type]


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL)
    yield connection
    await connection.aclose()


class TestOperations:
    async def test_over_the_window_is_refused_with_when_to_retry(self) -> None:
        limits = TeamLimits(fresh_settings(team_requests_per_sec=1.0, team_request_window_sec=3))
        for _ in range(3):
            await limits.count_operations(1)
        with pytest.raises(RateLimited) as refused:
            await limits.count_operations(1)
        retry_after = refused.value.retry_after_sec
        assert retry_after is not None and 0 < retry_after <= 3.01
        assert refused.value.extensions == {"code": "RATE_LIMITED", "retryAfterSec": retry_after}
        await limits.count_operations(2)  # another team's budget is its own

    async def test_a_batch_counts_each_operation(self) -> None:
        limits = TeamLimits(fresh_settings(team_requests_per_sec=2.0, team_request_window_sec=1))
        with pytest.raises(RateLimited):
            await limits.count_operations(1, count=3)

    async def test_zero_is_no_limit(self) -> None:
        limits = TeamLimits(fresh_settings(team_requests_per_sec=0.0))
        for _ in range(500):
            await limits.count_operations(1)


class TestSlots:
    async def test_in_memory_a_released_slot_is_free_again(self) -> None:
        limits = TeamLimits(fresh_settings(team_max_concurrent_execs=1))
        async with limits.exec_slot(1):
            with pytest.raises(RateLimited, match="execs at once"):
                async with limits.exec_slot(1):
                    pass
            async with limits.exec_slot(2):
                pass
        async with limits.exec_slot(1):
            pass

    async def test_in_redis_replicas_share_slots_and_a_dead_ones_run_out(self, client: redis.Redis) -> None:
        settings = fresh_settings(ws_max_connections_per_team=1)
        dead = TeamLimits(settings, client, lease_sec=LEASE_SEC)
        alive = TeamLimits(settings, client, lease_sec=LEASE_SEC)
        assert await dead.open_connection(1) is not None  # held, never released nor renewed
        with pytest.raises(RateLimited):
            await alive.open_connection(1)
        async with asyncio.timeout(10 * LEASE_SEC):
            while True:
                try:
                    slot = await alive.open_connection(1)
                    break
                except RateLimited:
                    await asyncio.sleep(0.1)
        assert slot is not None
        await slot.release()
        assert await alive.open_connection(1) is not None

    async def test_in_redis_a_renewed_slot_outlives_its_lease(self, client: redis.Redis) -> None:
        settings = fresh_settings(team_max_concurrent_execs=1)
        holder = TeamLimits(settings, client, lease_sec=LEASE_SEC)
        other = TeamLimits(settings, client, lease_sec=LEASE_SEC)
        renewer = asyncio.create_task(holder.renew_forever())
        try:
            async with holder.exec_slot(1):
                await asyncio.sleep(3 * LEASE_SEC)  # what the lease alone would not survive
                with pytest.raises(RateLimited):
                    async with other.exec_slot(1):
                        pass
            async with other.exec_slot(1):
                pass
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)


class TestSettings:
    def test_defaults(self) -> None:
        settings = Settings.from_env({})
        assert (settings.team_requests_per_sec, settings.team_request_window_sec) == (50.0, 2)
        assert (settings.team_max_concurrent_execs, settings.ws_max_connections_per_team) == (16, 500)
        assert (settings.ws_allowed_origins, settings.ws_init_timeout_sec) == ((), 10.0)
        assert settings.ws_max_subscriptions == 100

    def test_read_from_the_environment(self) -> None:
        env = {
            "CAPSULE_TEAM_REQUESTS_PER_SEC": "5",
            "CAPSULE_TEAM_REQUEST_WINDOW_SEC": "10",
            "CAPSULE_WS_ALLOWED_ORIGINS": "https://app.example.com, http://localhost:3000",
            "CAPSULE_WS_INIT_TIMEOUT_SEC": "2.5",
        }
        settings = Settings.from_env(env)
        assert (settings.team_requests_per_sec, settings.team_request_window_sec) == (5.0, 10)
        assert settings.ws_allowed_origins == ("https://app.example.com", "http://localhost:3000")
        assert settings.ws_init_timeout_sec == 2.5

    @pytest.mark.parametrize(
        ("env", "words"),
        [
            ({"CAPSULE_WS_ALLOWED_ORIGINS": "app.example.com"}, "is not an origin"),
            ({"CAPSULE_WS_ALLOWED_ORIGINS": "https://app.example.com/path"}, "is not an origin"),
            ({"CAPSULE_TEAM_REQUEST_WINDOW_SEC": "0"}, "1 second or more"),
            ({"CAPSULE_TEAM_REQUEST_WINDOW_SEC": "1.5"}, "is not a whole number"),
            ({"CAPSULE_WS_INIT_TIMEOUT_SEC": "0"}, "more than 0 seconds"),
            ({"CAPSULE_TEAM_MAX_CONCURRENT_EXECS": "-1"}, "is negative"),
        ],
    )
    def test_bad_values_stop_the_start(self, env: dict[str, str], words: str) -> None:
        with pytest.raises(ConfigError, match=words):
            Settings.from_env(env)

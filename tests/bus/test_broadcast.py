"""The bus on its real backends: delivery, replicas, overflow, and connections dropped for real."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest
from redis import asyncio as redis

from app.bus import postgres_backend, redis_backend
from app.bus.broadcast import Bus, BusOverflow
from app.config import ConfigError
from app.errors import BusUnavailable, ErrorCode

REDIS_URL = os.environ.get("CAPSULE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES_URL = os.environ.get("CAPSULE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
DEADLINE = 5.0


def channel_name() -> str:
    return f"test-{uuid.uuid4().hex}"


async def next_message(messages: AsyncIterator[str]) -> str:
    async with asyncio.timeout(DEADLINE):
        return await anext(messages)


@pytest.fixture(params=["memory://", REDIS_URL, POSTGRES_URL], ids=["memory", "redis", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def bus(url: str) -> AsyncIterator[Bus]:
    bus = Bus(url, timeout_sec=2.0)
    await bus.connect()
    yield bus
    await bus.disconnect()


async def kill_redis_connections(*roles: str) -> int:
    """Closes this process's bus connections in Redis (both roles by default) as a restart would."""
    names = {redis_backend.client_name(role) for role in roles or ("listen", "publish")}
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        clients = await admin.client_list()
        ids = [c["id"] for c in clients if c.get("name") in names]
        for client_id in ids:
            await admin.client_kill_filter(_id=client_id)
        return len(ids)
    finally:
        await admin.aclose()


async def kill_postgres_connections(*roles: str) -> int:
    """Terminates this process's bus sessions in PostgreSQL (both roles by default)."""
    names = [postgres_backend.client_name(role) for role in roles or ("listen", "notify")]
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1)",
            names,
        )
        return len(rows)
    finally:
        await admin.close()


class TestPublishSubscribe:
    async def test_messages_arrive_in_order(self, bus: Bus) -> None:
        channel = channel_name()
        async with bus.subscribe(channel) as messages:
            for text in ("one", "two", "three"):
                await bus.publish(channel, text)
            assert [await next_message(messages) for _ in range(3)] == ["one", "two", "three"]

    async def test_other_channels_are_not_seen(self, bus: Bus) -> None:
        mine, other = channel_name(), channel_name()
        async with bus.subscribe(mine) as messages:
            await bus.publish(other, "not for me")
            await bus.publish(mine, "for me")
            assert await next_message(messages) == "for me"

    async def test_every_subscriber_gets_every_message(self, bus: Bus) -> None:
        channel = channel_name()
        async with bus.subscribe(channel) as first:
            async with bus.subscribe(channel) as second:
                await bus.publish(channel, "both")
                assert await next_message(first) == "both"
                assert await next_message(second) == "both"
            # The channel stays subscribed while one subscriber remains.
            await bus.publish(channel, "first only")
            assert await next_message(first) == "first only"

    async def test_resubscribing_gets_each_message_once(self, bus: Bus) -> None:
        channel = channel_name()
        async with bus.subscribe(channel) as messages:
            await bus.publish(channel, "before")
            assert await next_message(messages) == "before"
        async with bus.subscribe(channel) as messages:
            await bus.publish(channel, "after")
            await bus.publish(channel, "end")
            assert [await next_message(messages) for _ in range(2)] == ["after", "end"]

    async def test_disconnect_ends_subscribers(self, bus: Bus) -> None:
        async with bus.subscribe(channel_name()) as messages:
            await bus.disconnect()
            with pytest.raises(BusUnavailable):
                await next_message(messages)

    async def test_unicode_and_large_messages(self, bus: Bus) -> None:
        channel = channel_name() + "-" + "x" * 80  # longer than a PostgreSQL identifier
        big = "é€🙂" * 9000  # past NOTIFY's 8000-byte payload limit, cut amid multibyte characters
        async with bus.subscribe(channel) as messages:
            await bus.publish(channel, big)
            await bus.publish(channel, "small")
            assert await next_message(messages) == big
            assert await next_message(messages) == "small"


@pytest.mark.parametrize("shared_url", [REDIS_URL, POSTGRES_URL], ids=["redis", "postgres"])
async def test_replicas_see_each_others_messages(shared_url: str) -> None:
    first, second = Bus(shared_url, timeout_sec=2.0), Bus(shared_url, timeout_sec=2.0)
    channel = channel_name()
    try:
        async with first.subscribe(channel) as on_first, second.subscribe(channel) as on_second:
            await first.publish(channel, "from first")
            await second.publish(channel, "from second")
            assert [await next_message(on_first) for _ in range(2)] == ["from first", "from second"]
            assert [await next_message(on_second) for _ in range(2)] == ["from first", "from second"]
    finally:
        await first.disconnect()
        await second.disconnect()


async def test_a_slow_subscriber_overflows(url: str) -> None:
    bus = Bus(url, queue_size=3, timeout_sec=2.0)
    channel = channel_name()
    try:
        async with bus.subscribe(channel) as slow, bus.subscribe(channel, queue_size=100) as fast:
            for number in range(10):
                await bus.publish(channel, str(number))
            # Both get each message at once: when the fast one has read ten, the slow one was offered ten.
            assert [await next_message(fast) for _ in range(10)] == [str(n) for n in range(10)]
            received: list[str] = []
            with pytest.raises(BusOverflow, match="fell 3 events behind"):
                async with asyncio.timeout(DEADLINE):
                    async for message in slow:
                        received.append(message)
            # What was buffered comes first, then the error says where delivery stopped.
            assert received == ["0", "1", "2"]
    finally:
        await bus.disconnect()


async def test_an_unreachable_backend_is_unavailable() -> None:
    bus = Bus("redis://127.0.0.1:1", timeout_sec=1.0)
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(BusUnavailable, match="cannot be reached; retry") as raised:
            await bus.publish(channel_name(), "lost")
        with pytest.raises(BusUnavailable):
            async with bus.subscribe(channel_name()):
                pass
    assert raised.value.code is ErrorCode.UNAVAILABLE


def test_an_unsupported_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="use memory://, redis:// or postgres://"):
        Bus("kafka://127.0.0.1:9092")


async def delivers(bus: Bus, channel: str, messages: AsyncIterator[str], text: str) -> None:
    """Publishes text and checks that the subscription receives it."""
    await bus.publish(channel, text)
    assert await next_message(messages) == text


Kill = Callable[..., Awaitable[int]]
KILLERS = pytest.mark.parametrize(
    ("backend_url", "kill", "publisher_role"),
    [(REDIS_URL, kill_redis_connections, "publish"), (POSTGRES_URL, kill_postgres_connections, "notify")],
    ids=["redis", "postgres"],
)


@KILLERS
async def test_a_dropped_connection_ends_subscribers_then_recovers(
    backend_url: str, kill: Kill, publisher_role: str
) -> None:
    bus = Bus(backend_url, timeout_sec=2.0)
    channel = channel_name()
    try:
        async with bus.subscribe(channel) as messages:
            await delivers(bus, channel, messages, "before")
            assert await kill() >= 1
            with pytest.raises(BusUnavailable):
                await next_message(messages)
        # The bus reconnects by itself for later subscriptions and publishes.
        async with bus.subscribe(channel) as messages:
            await delivers(bus, channel, messages, "after")
    finally:
        await bus.disconnect()


@KILLERS
async def test_a_dropped_publisher_connection_is_replaced_quietly(
    backend_url: str, kill: Kill, publisher_role: str
) -> None:
    bus = Bus(backend_url, timeout_sec=2.0)
    channel = channel_name()
    try:
        async with bus.subscribe(channel) as messages:
            await delivers(bus, channel, messages, "before")
            assert await kill(publisher_role) >= 1
            # The subscriber's own connection is intact, so it keeps receiving.
            await delivers(bus, channel, messages, "after")
    finally:
        await bus.disconnect()


async def woken(wake: asyncio.Event) -> None:
    """Waits for a news watch's event, then clears it for the next one."""
    async with asyncio.timeout(DEADLINE):
        await wake.wait()
    wake.clear()


class TestNews:
    async def test_each_message_wakes_the_watch(self, bus: Bus) -> None:
        channel, wake = channel_name(), asyncio.Event()
        async with bus.news(channel, wake):
            await bus.publish(channel_name(), "elsewhere")
            await bus.publish(channel, "1")
            await woken(wake)
            await bus.publish(channel, "2")
            await woken(wake)
        await bus.publish(channel, "3")
        await asyncio.sleep(0)
        assert not wake.is_set()

    async def test_a_watch_shares_its_channel_with_subscribers(self, bus: Bus) -> None:
        channel, wake = channel_name(), asyncio.Event()
        async with bus.subscribe(channel) as messages:
            async with bus.news(channel, wake):
                await delivers(bus, channel, messages, "both")
                await woken(wake)
            # The channel stays subscribed for the subscriber that remains.
            await delivers(bus, channel, messages, "subscriber only")


@KILLERS
async def test_a_watch_outlives_a_dropped_connection(
    backend_url: str, kill: Kill, publisher_role: str
) -> None:
    bus = Bus(backend_url, timeout_sec=2.0)
    channel, wake = channel_name(), asyncio.Event()
    try:
        async with bus.news(channel, wake), bus.subscribe(channel) as messages:
            await delivers(bus, channel, messages, "before")
            await woken(wake)
            assert await kill() >= 1
            # Subscribed again by itself: the watch is woken, as messages may have been lost meanwhile.
            await woken(wake)
            async with asyncio.timeout(DEADLINE):
                while True:  # the publisher reconnects on its own, a moment later maybe
                    try:
                        await bus.publish(channel, "after")
                        break
                    except BusUnavailable:
                        await asyncio.sleep(0.05)
            await woken(wake)
            # The plain subscriber ended with the connection, as before.
            with pytest.raises(BusUnavailable):
                await next_message(messages)
    finally:
        await bus.disconnect()


async def test_a_watch_waits_for_an_unreachable_backend() -> None:
    bus = Bus("redis://127.0.0.1:1", timeout_sec=1.0)
    wake = asyncio.Event()
    try:
        async with asyncio.timeout(DEADLINE), bus.news(channel_name(), wake):
            await asyncio.sleep(0.3)  # long enough for a few tries to fail; none of them may raise
            assert not wake.is_set()
    finally:
        await bus.disconnect()

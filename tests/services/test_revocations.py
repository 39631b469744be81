"""KeyRevocations: watchers of a revoked key wake by the bus at once, or by the periodic check."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from app.bus.broadcast import Bus
from app.bus.events import KEY_REVOKED_CHANNEL, key_revoked_to_json
from app.services.keys import KeyService
from app.services.revocations import KeyRevocations
from app.store.session import Database

DEADLINE_SEC = 10


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    bus = Bus("memory://")
    await bus.connect()
    yield bus
    await bus.disconnect()


async def _key_id(keys: KeyService) -> int:
    _, key = await keys.create_key("acme")
    credential = await keys.credential(key)
    assert credential is not None
    return credential.key_id


async def _running(revocations: KeyRevocations) -> asyncio.Task[None]:
    return asyncio.create_task(revocations.run())


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait({task})


async def test_the_bus_wakes_the_key_s_watchers_only(database: Database, bus: Bus) -> None:
    keys = KeyService(database, bus=bus)
    revoked_id, kept_id = await _key_id(keys), await _key_id(keys)
    # No periodic check within the test, and the store has nothing revoked: only the bus can wake anyone.
    revocations = KeyRevocations(keys=keys, bus=bus, interval_sec=3600)
    task = await _running(revocations)
    try:
        with revocations.watch(revoked_id) as revoked, revocations.watch(kept_id) as kept:
            async with asyncio.timeout(DEADLINE_SEC):
                while not revoked.is_set():  # until the job has subscribed and heard one
                    await bus.publish(KEY_REVOKED_CHANNEL, "not json")  # ignored, and the job goes on
                    await bus.publish(KEY_REVOKED_CHANNEL, key_revoked_to_json(revoked_id))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(revoked.wait(), 0.1)
            assert not kept.is_set()
        assert revocations.watched == frozenset()
    finally:
        await _stop(task)


async def test_the_periodic_check_wakes_them_without_a_bus_message(database: Database, bus: Bus) -> None:
    silent = KeyService(database)  # as the CLI on the memory bus: nothing announced
    key_id = await _key_id(silent)
    revocations = KeyRevocations(keys=silent, bus=bus, interval_sec=0.05)
    task = await _running(revocations)
    try:
        with revocations.watch(key_id) as first, revocations.watch(key_id) as second:
            assert revocations.watched == {key_id}
            await silent.revoke_id(key_id)
            async with asyncio.timeout(DEADLINE_SEC):
                await first.wait()
                await second.wait()
    finally:
        await _stop(task)


async def test_check_once_without_watchers_asks_nothing(database: Database, bus: Bus) -> None:
    revocations = KeyRevocations(keys=KeyService(database), bus=bus, interval_sec=1)
    assert await revocations.check_once() == set()

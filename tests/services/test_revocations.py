"""KeyRevocations: watchers of a revoked key wake by the bus at once, or by the periodic check."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

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


@contextlib.contextmanager
def watch(revocations: KeyRevocations, key_id: int) -> Iterator[asyncio.Event]:
    """An event set once the key is revoked, subscribed for as long as the block runs."""
    revoked = asyncio.Event()
    unsubscribe = revocations.subscribe(key_id, revoked.set)
    try:
        yield revoked
    finally:
        unsubscribe()


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
    # No periodic check within the test: only a bus message can wake anyone, and only for a key the
    # store has as revoked (a message naming a key it does not, as another deployment's would, is no
    # reason to end a connection).
    revocations = KeyRevocations(keys=keys, bus=bus, interval_sec=3600)
    task = await _running(revocations)
    try:
        with watch(revocations, revoked_id) as revoked, watch(revocations, kept_id) as kept:
            await KeyService(database).revoke_id(revoked_id)  # in the store, announced to nobody
            async with asyncio.timeout(DEADLINE_SEC):
                while not revoked.is_set():  # until the job has subscribed and heard one
                    await bus.publish(KEY_REVOKED_CHANNEL, "not json")  # ignored, and the job goes on
                    await bus.publish(KEY_REVOKED_CHANNEL, key_revoked_to_json(kept_id))
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
        with watch(revocations, key_id) as first, watch(revocations, key_id) as second:
            assert revocations.watched == {key_id}
            await silent.revoke_id(key_id)
            async with asyncio.timeout(DEADLINE_SEC):
                await first.wait()
                await second.wait()
    finally:
        await _stop(task)


async def test_a_subscriber_is_called_once_when_its_key_is_revoked(database: Database, bus: Bus) -> None:
    keys = KeyService(database)
    key_id, other_id = await _key_id(keys), await _key_id(keys)
    revocations = KeyRevocations(keys=keys, bus=bus, interval_sec=3600)
    calls: list[str] = []
    unsubscribe = revocations.subscribe(key_id, lambda: calls.append("kept"))
    gone = revocations.subscribe(key_id, lambda: calls.append("gone"))
    revocations.subscribe(other_id, lambda: calls.append("other"))
    gone()
    await keys.revoke_id(key_id)
    assert await revocations.check_once() == {key_id}
    assert calls == ["kept"]
    assert revocations.watched == {other_id}  # called once: its connection ends
    await revocations.check_once()
    assert calls == ["kept"]
    unsubscribe()  # at the connection's end, as always
    assert revocations.watched == {other_id}


async def test_check_once_without_watchers_asks_nothing(database: Database, bus: Bus) -> None:
    revocations = KeyRevocations(keys=KeyService(database), bus=bus, interval_sec=1)
    assert await revocations.check_once() == set()


class TestVerifiedKeys:
    """KeyService takes a verified key at its word for a moment, never past a revocation it hears of."""

    async def test_a_revocation_here_is_refused_at_once(self, database: Database) -> None:
        keys = KeyService(database)
        _, key = await keys.create_key("acme")
        assert await keys.authenticate(key) is not None
        assert await keys.revoke(key) is True
        assert await keys.authenticate(key) is None

    async def test_a_revocation_elsewhere_is_refused_after_the_check_or_the_bus(
        self, database: Database, bus: Bus
    ) -> None:
        here, elsewhere = KeyService(database, bus=bus), KeyService(database)  # elsewhere: no bus
        _, by_check = await here.create_key("acme")
        _, by_bus = await here.create_key("acme")
        first, second = await here.credential(by_check), await here.credential(by_bus)
        assert first is not None and second is not None
        assert {first.key_id, second.key_id} <= here.verified_ids
        revocations = KeyRevocations(keys=here, bus=bus, interval_sec=3600)
        # Revoked in the store behind this replica's back: still taken at its word here, until the
        # check, which looks at every verified key, not only those of open connections.
        await elsewhere.revoke_id(first.key_id)
        assert await here.authenticate(by_check) is not None
        assert await revocations.check_once() == {first.key_id}
        assert await here.authenticate(by_check) is None
        # Announced on the bus: forgotten as soon as the message comes.
        task = await _running(revocations)
        try:
            await elsewhere.revoke_id(second.key_id)
            await bus.publish(KEY_REVOKED_CHANNEL, key_revoked_to_json(second.key_id))
            async with asyncio.timeout(DEADLINE_SEC):
                while second.key_id in here.verified_ids:
                    await asyncio.sleep(0.01)
            assert await here.authenticate(by_bus) is None
        finally:
            await _stop(task)

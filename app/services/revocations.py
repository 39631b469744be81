"""KeyRevocations: tells each open connection when its API key is revoked, on every replica."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.bus.broadcast import Bus
from app.bus.events import KEY_REVOKED_CHANNEL, key_revoked_from_json
from app.errors import BusUnavailable
from app.services.keys import KeyService

logger = logging.getLogger(__name__)


class KeyRevocations:
    """Wakes the watchers of a revoked key: at once when the revocation comes over the bus, and
    within one interval when it does not (the bus was down, or the revoking CLI had the memory bus).

    The periodic check is one query on the primary key for all the keys watched on this replica.
    """

    def __init__(self, *, keys: KeyService, bus: Bus, interval_sec: float) -> None:
        self._keys, self._bus, self._interval = keys, bus, interval_sec
        # What to call once each key is revoked: a callable per open connection, and nothing else
        # (no task and no event of its own waits for a revocation that will likely never come).
        self._watchers: dict[int, set[Callable[[], None]]] = {}

    def subscribe(self, key_id: int, on_revoked: Callable[[], None]) -> Callable[[], None]:
        """Calls on_revoked (on the event loop, once) when the key is revoked; returns what ends that."""
        self._watchers.setdefault(key_id, set()).add(on_revoked)

        def unsubscribe() -> None:
            watchers = self._watchers.get(key_id)
            if watchers is not None:
                watchers.discard(on_revoked)
                if not watchers:
                    del self._watchers[key_id]

        return unsubscribe

    @property
    def watched(self) -> frozenset[int]:
        """The ids of the keys some connection on this replica is watching."""
        return frozenset(self._watchers)

    async def run(self) -> None:
        """Follows the bus and checks the store every interval, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_bus(), name="key-revocations-bus")
            group.create_task(self._check_every_interval(), name="key-revocations-check")

    async def check_once(self) -> set[int]:
        """Wakes the watchers of every watched key the store has as revoked, and forgets every
        verified key it has as revoked; returns those keys."""
        key_ids = sorted(set(self._watchers) | self._keys.verified_ids)
        if not key_ids:
            return set()
        revoked = await self._keys.revoked_among(key_ids)
        for key_id in revoked:
            self._wake(key_id)
        return revoked

    def _wake(self, key_id: int) -> None:
        self._keys.forget(key_id)
        watchers = self._watchers.pop(key_id, set())  # each is called once: its connection ends
        if watchers:
            logger.info("API key %s is revoked: ending its %d open connection(s)", key_id, len(watchers))
        for on_revoked in watchers:
            on_revoked()

    async def _check_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_once()
            except Exception:
                logger.exception("checking open connections' API keys failed")

    async def _follow_bus(self) -> None:
        while True:
            try:
                async with self._bus.subscribe(KEY_REVOKED_CHANNEL) as messages:
                    # Whatever was revoked while this replica was not listening.
                    await self.check_once()
                    async for message in messages:
                        if (key_id := self._on_message(message)) is not None:
                            await self._confirm(key_id)
            except BusUnavailable:
                logger.warning("key revocations: the bus is unreachable; the periodic check goes on")
            except Exception:
                logger.exception("key revocations: following the bus failed")
            await asyncio.sleep(self._interval)

    def _on_message(self, message: str) -> int | None:
        try:
            return key_revoked_from_json(message)
        except ValueError as exc:
            logger.warning("key revocations: ignored a malformed message: %s", exc)
            return None

    async def _confirm(self, key_id: int) -> None:
        """Ends the key's connections once the store says it is revoked: the bus only says where to
        look (a deployment of another store on the same Redis may name the same id)."""
        self._keys.forget(key_id)
        if key_id in self._watchers and key_id in await self._keys.revoked_among([key_id]):
            self._wake(key_id)

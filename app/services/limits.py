"""Per-team limits: a moving window of operations, and slots for concurrent execs and WebSockets.

Where the bus is Redis, both live in Redis, so every replica draws on one budget per team; anywhere
else they live in this replica's memory. A slot in Redis is a lease that its replica renews while it
holds the slot, so a replica that dies holding slots frees them within SLOT_LEASE_SEC.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

if TYPE_CHECKING:  # redis is loaded where the bus is Redis only: the default server goes without it
    from redis import asyncio as redis

from app import metrics
from app.config import Settings, bus_backend_kind
from app.errors import RateLimited

logger = logging.getLogger(__name__)

# A replica renews its Redis slots every third of this; one that died frees them within it.
SLOT_LEASE_SEC = 30.0
# When a slot frees is not known: the advice a refused exec or connection gets.
SLOT_RETRY_AFTER_SEC = 1.0
REDIS_TIMEOUT_SEC = 2.0
# Warnings that the limits' store is unreachable come at most this often.
WARN_INTERVAL_SEC = 30.0

# Takes a slot (ARGV: limit, lease ms, member) where fewer than limit leases are alive; Redis's own
# clock judges the leases, so replicas whose clocks differ still agree.
_ACQUIRE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# Extends the leases of the members still held (ARGV: lease ms, members...); XX never brings back a
# slot released meanwhile.
_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ms + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class _Slots(Protocol):
    async def acquire(self, key: str, limit: int, member: str) -> bool: ...
    async def release(self, key: str, member: str) -> None: ...
    async def renew(self, key: str, members: Iterable[str]) -> None: ...


class _MemorySlots:
    """Slots counted in this replica alone."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    async def acquire(self, key: str, limit: int, member: str) -> bool:
        if self._held[key] >= limit:
            return False
        self._held[key] += 1
        return True

    async def release(self, key: str, member: str) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]

    async def renew(self, key: str, members: Iterable[str]) -> None:
        return None


class _RedisSlots:
    """Slots as leases in a sorted set per team and kind, shared by every replica."""

    def __init__(self, client: redis.Redis, lease_sec: float) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._lease_ms = int(lease_sec * 1000)

    async def acquire(self, key: str, limit: int, member: str) -> bool:
        return bool(await self._acquire(keys=[key], args=[limit, self._lease_ms, member]))

    async def release(self, key: str, member: str) -> None:
        await self._client.zrem(key, member)

    async def renew(self, key: str, members: Iterable[str]) -> None:
        await self._renew(keys=[key], args=[self._lease_ms, *members])


@dataclass
class Slot:
    """One held exec or WebSocket slot; release() gives it back, once."""

    limits: TeamLimits
    key: str
    member: str = field(default_factory=lambda: uuid.uuid4().hex)
    released: bool = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self.limits.release(self)


def _retry_after(reset_at: float) -> float:
    """Seconds until reset_at, rounded up to the millisecond and a millisecond past it."""
    return max(math.ceil((reset_at - time.time()) * 1000) + 1, 1) / 1000


class TeamLimits:
    """Counts each team's operations and holds its exec and WebSocket slots; built once per server."""

    def __init__(
        self, settings: Settings, client: redis.Redis | None = None, *, lease_sec: float = SLOT_LEASE_SEC
    ) -> None:
        self._settings = settings
        self._lease_sec = lease_sec
        # Teams are a database's: deployments that share a Redis but not a database share no budget.
        database = hashlib.sha256(settings.database_url.encode()).hexdigest()[:16]
        self._prefix = f"capsule-limits:{database}"
        # What a call to the limits' store raises when the store cannot be reached.
        self._unreachable: tuple[type[Exception], ...] = (OSError,)
        if client is None:
            storage: MemoryStorage | RedisStorage = MemoryStorage()
            self._slots: _Slots = _MemorySlots()
        else:
            from redis.exceptions import RedisError

            self._unreachable = (RedisError, OSError)
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                key_prefix=self._prefix,
                wrap_exceptions=True,
                connection_pool=client.connection_pool,  # type: ignore[arg-type]  # passed on to redis-py
            )
            self._slots = _RedisSlots(client, lease_sec)
        self._window = MovingWindowRateLimiter(storage)
        window_sec = settings.team_request_window_sec
        self._operations: RateLimitItem | None = None
        if settings.team_requests_per_sec > 0:
            amount = max(1, math.ceil(settings.team_requests_per_sec * window_sec))
            self._operations = RateLimitItemPerSecond(amount, window_sec, namespace="operations")
        self._held: dict[str, set[str]] = {}
        self._warned_at = -math.inf

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[TeamLimits]:
        """The limits for these settings: in Redis where the bus is, renewed until the block ends."""
        if bus_backend_kind(settings.bus_url) != "redis":
            yield cls(settings)
            return
        from redis import asyncio as redis

        client = redis.Redis.from_url(
            settings.bus_url,
            socket_connect_timeout=REDIS_TIMEOUT_SEC,
            socket_timeout=REDIS_TIMEOUT_SEC,
            client_name="capsule-limits",
        )
        limits = cls(settings, client)
        renewer = asyncio.create_task(limits.renew_forever(), name="limits-renew")
        try:
            yield limits
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            await client.aclose()

    async def count_operations(self, team_id: int, count: int = 1) -> None:
        """Counts a team's GraphQL operations; RateLimited, with when to retry, past its budget."""
        item = self._operations
        if item is None:
            return
        try:
            if await self._window.hit(item, str(team_id), cost=count):
                return
            stats = await self._window.get_window_stats(item, str(team_id))
        except StorageError as exc:
            self._warn_unreachable(exc)
            return
        retry_after = _retry_after(stats.reset_time)
        metrics.RATE_LIMITED.labels("operations").inc()
        raise RateLimited(
            f"this team is over its {item.amount} operations in any {item.multiples} s: "
            f"retry in {retry_after:g} s",
            retry_after_sec=retry_after,
        )

    @asynccontextmanager
    async def exec_slot(self, team_id: int) -> AsyncIterator[None]:
        """Holds one of a team's concurrent exec slots for the block; RateLimited when none is free."""
        limit = self._settings.team_max_concurrent_execs
        slot = await self._acquire(
            "execs",
            team_id,
            limit,
            f"this team already runs {limit} execs at once, its limit: retry once one has ended",
        )
        try:
            yield
        finally:
            if slot is not None:
                await slot.release()

    async def open_connection(self, team_id: int) -> Slot | None:
        """Takes one of a team's WebSocket connection slots until released; RateLimited when none is free."""
        limit = self._settings.ws_max_connections_per_team
        return await self._acquire(
            "connections",
            team_id,
            limit,
            f"this team already has {limit} WebSocket connections open, its limit: close one, or retry later",
        )

    async def _acquire(self, kind: str, team_id: int, limit: int, refusal: str) -> Slot | None:
        if limit <= 0:
            return None
        slot = Slot(self, f"{self._prefix}:{kind}:{team_id}")
        try:
            taken = await self._slots.acquire(slot.key, limit, slot.member)
        except self._unreachable as exc:
            self._warn_unreachable(exc)
            return None
        if not taken:
            metrics.RATE_LIMITED.labels(kind).inc()
            raise RateLimited(refusal, retry_after_sec=SLOT_RETRY_AFTER_SEC)
        self._held.setdefault(slot.key, set()).add(slot.member)
        return slot

    async def release(self, slot: Slot) -> None:
        """Gives a slot back; Slot.release calls it."""
        members = self._held.get(slot.key, set())
        members.discard(slot.member)
        if not members:
            self._held.pop(slot.key, None)
        try:
            await self._slots.release(slot.key, slot.member)
        except self._unreachable as exc:  # its lease runs out instead
            self._warn_unreachable(exc)

    async def renew_forever(self) -> None:
        """Renews this replica's slots in Redis every third of their lease, until cancelled."""
        while True:
            await asyncio.sleep(self._lease_sec / 3)
            for key, members in list(self._held.items()):
                if not members:
                    continue
                try:
                    await self._slots.renew(key, list(members))
                except self._unreachable as exc:
                    self._warn_unreachable(exc)

    def _warn_unreachable(self, error: Exception) -> None:
        # An unreachable store lets work through: the limits guard the service, they must not stop it.
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL_SEC:
            self._warned_at = now
            logger.warning("the team limits' store cannot be reached, so no limit applies now: %s", error)

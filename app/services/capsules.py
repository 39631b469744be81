"""Capsules of one team: create, destroy, list, and the one team-and-state check."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from app.domain import (
    CapsuleInfo,
    CapsuleLimits,
    CapsuleStatus,
    RequestedLimits,
    ResourceUsage,
    Team,
    utcnow,
)
from app.errors import HostUnavailable, InvalidRequest, InvalidState, NotFound, RateLimited
from app.hosts.pool import HostPool
from app.services.hosts import HostService
from app.services.lifecycle import CapsuleLifecycle
from app.store import models
from app.store.repositories import CapsuleRepository, capsule_of_team
from app.store.session import Database

logger = logging.getLogger(__name__)

MAX_CAPSULE_TIMEOUT_SEC = 7 * 24 * 3600


class CapsuleActivity:
    """When this replica last began to mark each capsule active."""

    # Marks older than this are forgotten once there are more than MAX_MARKS.
    FORGET_SEC = 60.0
    MAX_MARKS = 10_000

    def __init__(self) -> None:
        self._marked: dict[str, float] = {}

    def claim(self, capsule_id: str, every: float) -> bool:
        """True (the capsule's turn taken) when this replica marked it `every` seconds ago or more."""
        now = time.monotonic()
        last = self._marked.get(capsule_id)
        if last is not None and now - last < every:
            return False
        if len(self._marked) >= self.MAX_MARKS:
            self._marked = {key: at for key, at in self._marked.items() if now - at < self.FORGET_SEC}
        self._marked[capsule_id] = now
        return True

    def release(self, capsule_id: str) -> None:
        """The mark claimed was not written: the next call tries again."""
        self._marked.pop(capsule_id, None)


class CapsuleService:
    """Capsule use cases for one team; built per request."""

    def __init__(
        self,
        *,
        db: Database,
        pool: HostPool,
        hosts: HostService,
        lifecycle: CapsuleLifecycle,
        activity: CapsuleActivity,
        team: Team,
        max_capsules: int,
        default_limits: CapsuleLimits,
    ) -> None:
        self._db, self._pool, self._hosts, self._lifecycle, self._team = db, pool, hosts, lifecycle, team
        self._activity = activity
        self._max_capsules = max_capsules
        self._default_limits = default_limits

    @property
    def team(self) -> Team:
        """The team these use cases act for."""
        return self._team

    async def get(self, capsule_id: str) -> CapsuleInfo | None:
        """This team's capsule, or None (another team's capsule is None too)."""
        return await capsule_of_team(self._db, self._team.id, capsule_id)

    async def require(self, capsule_id: str) -> CapsuleInfo:
        """This team's capsule in any state, or NotFound."""
        capsule = await self.get(capsule_id)
        if capsule is None:  # another team's capsule lands here too, with the same words
            raise NotFound(f"no capsule {capsule_id}")
        return capsule

    async def require_running(self, capsule_id: str) -> CapsuleInfo:
        """Turns a capsule id into this team's running capsule, or raises; touches lastActiveAt."""
        capsule = await self.require(capsule_id)
        if capsule.status is not CapsuleStatus.RUNNING:
            raise InvalidState(f"capsule {capsule_id} is {capsule.status.value}, not RUNNING")
        now = utcnow()
        # One write per busy stretch, not per call: a tenth of the idle timeout, a second at most; and
        # of the calls that arrive together (all of them read the same lastActiveAt), one writes.
        every = min(1.0, capsule.timeout_sec / 10)
        idle_for = (now - capsule.last_active_at).total_seconds()
        if idle_for >= every and self._activity.claim(capsule_id, every):
            try:
                await self._touch(capsule_id, now)
            except BaseException:
                self._activity.release(capsule_id)
                raise
        return capsule

    async def _touch(self, capsule_id: str, now: datetime) -> None:
        async with self._db.transaction() as session:
            await CapsuleRepository(session, self._team.id).touch(capsule_id, now)

    @asynccontextmanager
    async def in_use(self, capsule: CapsuleInfo) -> AsyncIterator[None]:
        """Keeps the capsule from counting as idle while a long call or a subscription runs."""
        interval = max(0.1, capsule.timeout_sec / 3)  # well inside the timeout, so no check falls between

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self._touch(capsule.id, utcnow())
                except Exception:  # the store is down: the idle reaper cannot act on it either
                    logger.warning("capsule %s: could not mark it active", capsule.id, exc_info=True)

        heart = asyncio.create_task(beat(), name=f"in-use-{capsule.id}")
        try:
            yield
        finally:
            heart.cancel()
            await asyncio.gather(heart, return_exceptions=True)

    async def list(self) -> list[CapsuleInfo]:
        """This team's capsules, newest first."""
        async with self._db.session() as session:
            rows = await CapsuleRepository(session, self._team.id).list()
        return [row.to_info() for row in rows]

    async def usage(self, capsule: CapsuleInfo) -> ResourceUsage | None:
        """What the capsule's processes use now, as its host measures it.

        None where its runtime cannot measure it, when it is not RUNNING (nothing of it is left to
        measure), and while its host cannot be reached: a capsule read must not fail for a figure.
        """
        if capsule.status is not CapsuleStatus.RUNNING:
            return None
        try:
            hosted = await self._pool.client(capsule.host_id).get_capsule(capsule.id)
        except (HostUnavailable, NotFound) as exc:  # NotFound: lost by its host, the reconciler's to mend
            logger.info("capsule %s: no usage from host %s: %s", capsule.id, capsule.host_id, exc)
            return None
        return hosted.usage

    async def create(
        self, *, timeout_sec: int, network: bool = False, limits: RequestedLimits | None = None
    ) -> CapsuleInfo:
        """Places a new capsule on a host and waits until it runs there.

        Limits left out are the server's defaults; network false keeps its processes to its loopback.
        """
        if not 1 <= timeout_sec <= MAX_CAPSULE_TIMEOUT_SEC:
            raise InvalidRequest(f"timeoutSec must be between 1 and {MAX_CAPSULE_TIMEOUT_SEC} seconds")
        checked = (limits or RequestedLimits()).over(self._default_limits)
        # Hosts registered since this replica started join its pool here.
        hosts = await self._hosts.hosts()
        self._pool.set_hosts(hosts)
        host_id = await self._hosts.choose(hosts)
        row = models.Capsule(
            id=f"cap-{secrets.token_hex(8)}",
            team_id=self._team.id,
            host_id=host_id,
            status=CapsuleStatus.STARTING,
            timeout_sec=timeout_sec,
            network=network,
            max_processes=checked.max_processes,
            memory_mib=checked.memory_mib,
            cpus=checked.cpus,
        )
        async with self._db.transaction() as session:
            capsules = CapsuleRepository(session, self._team.id)
            await capsules.lock_team()  # creates of one team at the same moment count one after another
            active = await capsules.count_active()
            if active >= self._max_capsules:
                raise RateLimited(
                    f"team {self._team.name} has {active} capsules running, the most it may have: "
                    "destroy one before creating another"
                )
            await capsules.add(row)
        capsule = await self._lifecycle.place(row.to_info())
        logger.info(
            "team %s created capsule %s on host %s",
            self._team.name,
            capsule.id,
            host_id,
            extra={"event": "capsule.created", "capsule": capsule.id, "host": host_id},
        )
        return capsule

    async def destroy(self, capsule_id: str) -> CapsuleInfo:
        """Ends every process of the capsule and removes it from its host; the record stays.

        STOPPED once the host confirmed; STOPPING while the host cannot be reached (the stop is
        retried until it can).
        """
        capsule = await self._lifecycle.stop(await self.require(capsule_id))
        logger.info("team %s destroyed capsule %s: %s", self._team.name, capsule_id, capsule.status.value)
        return capsule

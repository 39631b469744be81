"""Capsules of one team: create, destroy, list, and the one team-and-state check."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.domain import CapsuleStatus, utcnow
from app.errors import CapsuleError, InvalidRequest, InvalidState, NotFound, RateLimited
from app.hosts.pool import HostPool
from app.services.hosts import HostService
from app.services.records import ProcessRecords
from app.store import models
from app.store.repositories import CapsuleRepository, SystemRepository
from app.store.session import Database

log = logging.getLogger(__name__)

MAX_CAPSULE_TIMEOUT_SEC = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Team:
    """The caller a team service acts for."""

    id: int
    name: str


class CapsuleService:
    """Capsule use cases for one team; built per request."""

    def __init__(
        self,
        *,
        db: Database,
        pool: HostPool,
        hosts: HostService,
        records: ProcessRecords,
        team: Team,
        max_capsules: int,
    ) -> None:
        self._db, self._pool, self._hosts, self._records, self._team = db, pool, hosts, records, team
        self._max_capsules = max_capsules

    async def get(self, capsule_id: str) -> models.Capsule | None:
        """This team's capsule, or None (another team's capsule is None too)."""
        async with self._db.session() as session:
            return await CapsuleRepository(session, self._team.id).get(capsule_id)

    async def require(self, capsule_id: str) -> models.Capsule:
        """This team's capsule in any state, or NotFound."""
        capsule = await self.get(capsule_id)
        if capsule is None:  # another team's capsule lands here too, with the same words
            raise NotFound(f"no capsule {capsule_id}")
        return capsule

    async def require_running(self, capsule_id: str) -> models.Capsule:
        """Turns a capsule id into this team's running capsule, or raises; touches lastActiveAt."""
        capsule = await self.require(capsule_id)
        if capsule.status is not CapsuleStatus.RUNNING:
            raise InvalidState(f"capsule {capsule_id} is {capsule.status.value}, not RUNNING")
        now = utcnow()
        # One write per busy stretch, not per call: a tenth of the idle timeout, a second at most.
        if (now - capsule.last_active_at).total_seconds() >= min(1.0, capsule.timeout_sec / 10):
            async with self._db.transaction() as session:
                await SystemRepository(session).touch(capsule_id, now)
        return capsule

    @asynccontextmanager
    async def in_use(self, capsule: models.Capsule) -> AsyncIterator[None]:
        """Keeps the capsule from counting as idle while a long call or a subscription runs."""
        interval = max(0.1, capsule.timeout_sec / 3)  # well inside the timeout, so no check falls between

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    async with self._db.transaction() as session:
                        await SystemRepository(session).touch(capsule.id, utcnow())
                except Exception:  # the store is down: the idle reaper cannot act on it either
                    log.warning("capsule %s: could not mark it active", capsule.id, exc_info=True)

        heart = asyncio.create_task(beat(), name=f"in-use-{capsule.id}")
        try:
            yield
        finally:
            heart.cancel()
            await asyncio.gather(heart, return_exceptions=True)

    async def list(self) -> list[models.Capsule]:
        """This team's capsules, newest first."""
        async with self._db.session() as session:
            return list(await CapsuleRepository(session, self._team.id).list())

    async def create(self, *, timeout_sec: int) -> models.Capsule:
        """Places a new capsule on a host and waits until it runs there."""
        if not 1 <= timeout_sec <= MAX_CAPSULE_TIMEOUT_SEC:
            raise InvalidRequest(f"timeoutSec must be between 1 and {MAX_CAPSULE_TIMEOUT_SEC} seconds")
        async with self._db.session() as session:
            active = await CapsuleRepository(session, self._team.id).count_active()
        if active >= self._max_capsules:
            raise RateLimited(
                f"team {self._team.name} has {active} capsules running, the most it may have: "
                "destroy one before creating another"
            )
        # Hosts registered since this replica started join its pool here.
        hosts = await self._hosts.hosts()
        self._pool.set_hosts(hosts)
        host_id = await self._hosts.choose(hosts)
        capsule = models.Capsule(
            id=f"cap-{secrets.token_hex(8)}",
            team_id=self._team.id,
            host_id=host_id,
            status=CapsuleStatus.STARTING,
            timeout_sec=timeout_sec,
        )
        async with self._db.transaction() as session:
            await CapsuleRepository(session, self._team.id).add(capsule)
        try:
            await self._pool.client(host_id).create_capsule(capsule.id)
        except CapsuleError:
            await self._set_status(capsule.id, CapsuleStatus.ERROR)
            raise
        log.info("team %s created capsule %s on host %s", self._team.name, capsule.id, host_id)
        return await self._set_status(capsule.id, CapsuleStatus.RUNNING)

    async def destroy(self, capsule_id: str) -> models.Capsule:
        """Ends every process of the capsule and removes it from its host; the record stays, STOPPED."""
        capsule = await self.require(capsule_id)
        if capsule.status is CapsuleStatus.STOPPED:
            return capsule
        await self._set_status(capsule_id, CapsuleStatus.STOPPING)
        await self._pool.client(capsule.host_id).destroy_capsule(capsule_id)
        await self._records.end_all(capsule_id)
        log.info("team %s destroyed capsule %s", self._team.name, capsule_id)
        return await self._set_status(capsule_id, CapsuleStatus.STOPPED)

    async def _set_status(self, capsule_id: str, status: CapsuleStatus) -> models.Capsule:
        async with self._db.transaction() as session:
            capsule = await SystemRepository(session).set_capsule_status(capsule_id, status)
        if capsule is None:
            raise NotFound(f"no capsule {capsule_id}")
        return capsule

"""The API server's own background work: recording exits and stopping idle capsules."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from app.domain import CapsuleStatus, ProcessEvent, ProcessEventKind, utcnow
from app.errors import CapsuleError, NotFound
from app.hosts.pool import HostPool
from app.services.hosts import HostService
from app.services.records import ProcessRecords
from app.store.repositories import SystemRepository
from app.store.session import Database

log = logging.getLogger(__name__)

RETRY_DELAYS_SEC = (0.2, 0.5, 1.0, 2.0, 5.0)
# How often hosts registered or moved since the last round are noticed.
CHECK_INTERVAL_SEC = 15.0


class ExitRecorder:
    """Follows each host's lifecycle stream and writes every exit to the store once."""

    def __init__(self, *, db: Database, pool: HostPool, hosts: HostService, records: ProcessRecords) -> None:
        self._db, self._pool, self._hosts, self._records = db, pool, hosts, records

    async def run(self) -> None:
        """Follows every known host until cancelled; hosts registered later are picked up."""
        followed: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    await self._round(followed)
                except Exception:  # the store may be down for a while; the next round tries again
                    log.exception("following the hosts failed")
                await asyncio.sleep(CHECK_INTERVAL_SEC)
        finally:
            for task in followed.values():
                task.cancel()
            await asyncio.gather(*followed.values(), return_exceptions=True)

    async def _round(self, followed: dict[str, asyncio.Task[None]]) -> None:
        hosts = await self._hosts.hosts()
        self._pool.set_hosts(hosts)  # hosts registered or moved since the last round
        for host_id in hosts:
            if host_id not in followed or followed[host_id].done():
                followed[host_id] = asyncio.create_task(self.follow(host_id))

    async def follow(self, host_id: str) -> None:
        """Follows one host, catching up on exits missed while the stream was down."""
        failures = 0
        while True:
            try:
                await self._follow_once(host_id)
                failures = 0
            except CapsuleError as exc:
                log.debug("host %s lifecycle stream: %s", host_id, exc)
            except Exception:  # the store, most likely; the stream is opened again after a pause
                log.exception("host %s: recording exits failed", host_id)
            await asyncio.sleep(RETRY_DELAYS_SEC[min(failures, len(RETRY_DELAYS_SEC) - 1)])
            failures += 1

    async def _follow_once(self, host_id: str) -> None:
        # Catch up only once the watch is registered, so that no exit falls between the two.
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            self._record_exits(self._pool.client(host_id).watch_processes("", subscribed=subscribed))
        )
        waiter = asyncio.create_task(subscribed.wait())
        try:
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if subscribed.is_set():
                await self.catch_up(host_id)
            await reader
        finally:
            for task in (reader, waiter):
                task.cancel()
            await asyncio.gather(reader, waiter, return_exceptions=True)

    async def _record_exits(self, events: AsyncGenerator[ProcessEvent, None]) -> None:
        async with aclosing(events):
            async for event in events:
                if event.kind is ProcessEventKind.EXITED:
                    await self._records.record_exit(event.process)

    async def catch_up(self, host_id: str) -> None:
        """Ends the records of processes that exited, or vanished, while nobody watched."""
        async with self._db.session() as session:
            capsule_ids = await SystemRepository(session).running_capsule_ids(host_id)
        client = self._pool.client(host_id)
        for capsule_id in capsule_ids:
            try:
                live = await client.list_processes(capsule_id)
            except NotFound:
                # The agent restarted and lost the capsule with its processes: give the capsule
                # back its place there (the workspace is kept) and end the lost processes' records.
                await client.create_capsule(capsule_id)
                live = []
            await self._records.reconcile(capsule_id, live)


class IdleReaper:
    """Stops capsules idle longer than their timeoutSec, killing their processes."""

    def __init__(self, *, db: Database, pool: HostPool, records: ProcessRecords, interval_sec: float) -> None:
        self._db, self._pool, self._records, self._interval = db, pool, records, interval_sec

    async def run(self) -> None:
        """Checks every interval until cancelled."""
        while True:
            try:
                await self.reap_once()
            except Exception:
                log.exception("idle capsule check failed")
            await asyncio.sleep(self._interval)

    async def reap_once(self) -> list[str]:
        """Stops each idle capsule this replica claims first; returns their ids."""
        async with self._db.transaction() as session:
            claimed = await SystemRepository(session).claim_idle_capsules(utcnow())
        for capsule in claimed:
            try:
                await self._pool.client(capsule.host_id).destroy_capsule(capsule.id)
            except CapsuleError as exc:
                log.warning("capsule %s idle stop on host %s failed: %s", capsule.id, capsule.host_id, exc)
            await self._records.end_all(capsule.id)
            async with self._db.transaction() as session:
                await SystemRepository(session).set_capsule_status(capsule.id, CapsuleStatus.STOPPED)
            log.info("capsule %s stopped after %ss idle", capsule.id, capsule.timeout_sec)
        return [c.id for c in claimed]

"""The capsule lifecycle in one place: placing and stopping capsules, and keeping the store and the
hosts in agreement (the exit recorder, the idle reaper and the reconciler).

The host agent is the truth about what runs; the store is the truth about what should. A state the
store writes is one a host has confirmed: a capsule is RUNNING once its host holds it, and STOPPED
only once its host has destroyed it (or has been seen not to hold it). Until then it stays STOPPING,
and the reconciler retries the stop whenever the host is back, and on a slow period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Collection, Coroutine, Sequence
from contextlib import aclosing
from datetime import datetime, timedelta
from typing import Any

from app.domain import (
    CapsuleInfo,
    CapsuleRuntime,
    CapsuleStatus,
    HostCapsule,
    ProcessEvent,
    ProcessEventKind,
    ProcessInfo,
    utcnow,
)
from app.errors import CapsuleError, HostUnavailable, NotFound
from app.hosts.client import HostClient
from app.hosts.pool import HostPool
from app.services.hosts import HostService, HostStates
from app.services.records import ProcessRecords
from app.store.repositories import CapsuleRepository, SystemRepository
from app.store.session import Database

logger = logging.getLogger(__name__)

STOPPABLE = frozenset(
    {CapsuleStatus.STARTING, CapsuleStatus.RUNNING, CapsuleStatus.STOPPING, CapsuleStatus.ERROR}
)
# A capsule STARTING for longer than this was left by a replica that died while creating it.
STARTING_GRACE = timedelta(minutes=2)
RETRY_DELAYS_SEC = (0.1, 0.25, 0.5)  # short: a restarted agent is noticed within 2 s
# How often hosts registered or moved since the last round are noticed.
HOSTS_CHECK_INTERVAL_SEC = 15.0
# Record writes (exits, restarts, readiness) the exit recorder has queued and not yet seen committed.
MAX_WRITES_IN_FLIGHT = 256


class CapsuleLifecycle:
    """Every change of a capsule's status, written only once its host has confirmed it."""

    def __init__(self, *, db: Database, pool: HostPool, records: ProcessRecords) -> None:
        self._db, self._pool, self._records = db, pool, records

    async def place(self, capsule: CapsuleInfo) -> CapsuleInfo:
        """Creates a STARTING capsule on its host: RUNNING once the host holds it, ERROR if it refused."""
        try:
            hosted = await self._pool.client(capsule.host_id).create_capsule(capsule.id, capsule.spec)
        except CapsuleError:
            await self._transition(capsule, CapsuleStatus.ERROR, only_from={CapsuleStatus.STARTING})
            raise
        running = await self._transition(
            capsule, CapsuleStatus.RUNNING, only_from={CapsuleStatus.STARTING}, runtime=hosted.runtime
        )
        return running or await self._current(capsule)  # destroyed meanwhile: what it is now

    async def stop(self, capsule: CapsuleInfo) -> CapsuleInfo:
        """Ends the capsule's processes and removes it from its host.

        STOPPED once the host confirmed; while the host cannot be reached it stays STOPPING, and the
        reconciler retries. Stopping a STOPPED capsule changes nothing.
        """
        stopping = await self._transition(capsule, CapsuleStatus.STOPPING, only_from=STOPPABLE)
        if stopping is None:
            return await self._current(capsule)
        if not await self._destroy_on_host(stopping):
            return stopping
        await self._records.end_all(stopping)
        stopped = await self._transition(stopping, CapsuleStatus.STOPPED, only_from={CapsuleStatus.STOPPING})
        if stopped is None:
            return await self._current(capsule)
        event = {"event": "capsule.stopped", "capsule": capsule.id, "host": capsule.host_id}
        logger.info("capsule %s stopped on host %s", capsule.id, capsule.host_id, extra=event)
        return stopped

    async def reconcile_host(self, host_id: str) -> None:
        """Brings the host and the store into agreement about the host's capsules and processes."""
        try:
            client = self._pool.client(host_id)
            hosted = {c.capsule_id: c for c in await client.list_capsules()}
        except HostUnavailable as exc:
            logger.debug("host %s: not reconciled: %s", host_id, exc)
            return
        async with self._db.session() as session:
            rows = await SystemRepository(session).capsules_to_reconcile(host_id, set(hosted))
        capsules = [row.to_info() for row in rows]
        unknown = set(hosted) - {c.id for c in capsules}
        if unknown:
            logger.warning("host %s holds capsules the store does not know, left alone: %s", host_id, unknown)
        now = utcnow()
        for capsule in capsules:
            try:
                await self._reconcile(client, capsule, hosted=hosted.get(capsule.id), now=now)
            except HostUnavailable as exc:
                logger.info("host %s: reconciling stopped half-way: %s", host_id, exc)
                return
            except CapsuleError as exc:
                logger.warning("capsule %s on host %s: not reconciled: %s", capsule.id, host_id, exc)

    async def _reconcile(
        self, client: HostClient, capsule: CapsuleInfo, *, hosted: HostCapsule | None, now: datetime
    ) -> None:
        match capsule.status:
            case CapsuleStatus.RUNNING:
                await self._reconcile_processes(client, capsule, on_host=hosted is not None)
            case CapsuleStatus.STARTING if now - capsule.created_at > STARTING_GRACE:
                if hosted is None:
                    await self._transition(capsule, CapsuleStatus.ERROR, only_from={CapsuleStatus.STARTING})
                    return
                running = await self._transition(
                    capsule, CapsuleStatus.RUNNING, only_from={CapsuleStatus.STARTING}, runtime=hosted.runtime
                )
                if running is not None:
                    await self._reconcile_processes(client, running, on_host=True)
            case CapsuleStatus.STOPPING:
                await self.stop(capsule)
            case CapsuleStatus.STOPPED | CapsuleStatus.ERROR:
                # Nothing may run for it: what its host still holds goes, and its records end.
                if hosted is not None and not await self._destroy_on_host(capsule):
                    return
                await self._records.end_all(capsule)

    async def _reconcile_processes(self, client: HostClient, capsule: CapsuleInfo, *, on_host: bool) -> None:
        """Ends the records of a RUNNING capsule's processes that exited or vanished unseen."""
        # Read before the host is asked, so that a process started meanwhile is not taken for lost.
        running = await self._records.running(capsule)
        live: Sequence[ProcessInfo] = ()
        if on_host:
            try:
                live = await client.list_processes(capsule.id)
            except NotFound:  # destroyed on the host since it was listed
                on_host = False
        if not on_host and not await self._restore(client, capsule, running):
            return
        await self._records.reconcile(capsule, running=running, live=live)

    async def _restore(
        self, client: HostClient, capsule: CapsuleInfo, running: Sequence[ProcessInfo]
    ) -> bool:
        """Gives a RUNNING capsule its place back on a host that lost it (its agent restarted).

        True when the capsule is back, without the processes it lost; where the host refuses, the
        capsule becomes ERROR and the records of `running` end, saying no more than when.
        """
        try:
            # The workspace on disk is kept; the isolation and limits are the capsule's own, not defaults.
            hosted = await client.create_capsule(capsule.id, capsule.spec)
        except HostUnavailable:
            raise
        except CapsuleError as exc:
            logger.warning("capsule %s: host %s cannot hold it again: %s", capsule.id, capsule.host_id, exc)
            errored = await self._transition(capsule, CapsuleStatus.ERROR, only_from={CapsuleStatus.RUNNING})
            if errored is not None:
                await self._records.reconcile(errored, running=running, live=(), killed=False)
            return False
        # An agent restarted with another runtime holds the capsule differently now: record how.
        current = await self._transition(
            capsule, CapsuleStatus.RUNNING, only_from={CapsuleStatus.RUNNING}, runtime=hosted.runtime
        ) or await self._current(capsule)
        if current.status is not CapsuleStatus.RUNNING:  # stopped while this ran: take it down again
            await self._destroy_on_host(current)
            return False
        logger.info("capsule %s: back on host %s, without the processes it lost", capsule.id, capsule.host_id)
        return True

    async def _destroy_on_host(self, capsule: CapsuleInfo) -> bool:
        """True once the host has confirmed the capsule is gone."""
        try:
            await self._pool.client(capsule.host_id).destroy_capsule(capsule.id)
        except NotFound:
            pass  # the host does not hold it: gone already
        except CapsuleError as exc:
            logger.warning(
                "capsule %s: host %s did not confirm the stop, retried later: %s",
                capsule.id,
                capsule.host_id,
                exc,
            )
            return False
        return True

    async def _transition(
        self,
        capsule: CapsuleInfo,
        status: CapsuleStatus,
        *,
        only_from: Collection[CapsuleStatus],
        runtime: CapsuleRuntime | None = None,
    ) -> CapsuleInfo | None:
        """Moves the capsule to status from one of only_from, recording the runtime its host reported
        (when given); the capsule as it is then, or None."""
        async with self._db.transaction() as session:
            row = await CapsuleRepository(session, capsule.team_id).set_status(
                capsule.id, status, only_from=only_from, runtime=runtime
            )
        return None if row is None else row.to_info()

    async def _current(self, capsule: CapsuleInfo) -> CapsuleInfo:
        async with self._db.session() as session:
            row = await CapsuleRepository(session, capsule.team_id).get(capsule.id)
        if row is None:
            raise NotFound(f"no capsule {capsule.id}")
        return row.to_info()


class ExitRecorder:
    """Follows each host's lifecycle stream, writes every exit to the store once, and reconciles
    a host with the store whenever its stream (re)connects."""

    def __init__(
        self, *, pool: HostPool, hosts: HostService, records: ProcessRecords, lifecycle: CapsuleLifecycle
    ):
        self._pool, self._hosts, self._records, self._lifecycle = pool, hosts, records, lifecycle
        self.states = HostStates()  # logs each host's unreachable and back, once each

    async def run(self) -> None:
        """Follows every known host until cancelled; hosts registered later are picked up."""
        followed: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                try:
                    await self._round(followed)
                except Exception:  # the store may be down for a while; the next round tries again
                    logger.exception("following the hosts failed")
                await asyncio.sleep(HOSTS_CHECK_INTERVAL_SEC)
        finally:
            for task in followed.values():
                task.cancel()
            await asyncio.gather(*followed.values(), return_exceptions=True)

    async def _round(self, followed: dict[str, asyncio.Task[None]]) -> None:
        hosts = await self._hosts.hosts()
        self._pool.set_hosts(hosts)  # hosts registered or moved since the last round
        for host_id in hosts:
            if host_id not in followed or followed[host_id].done():
                followed[host_id] = asyncio.create_task(self.follow(host_id), name=f"follow-{host_id}")

    async def follow(self, host_id: str) -> None:
        """Follows one host, reconciling each time its stream is (re)opened."""
        failures = 0
        while True:
            try:
                await self._follow_once(host_id)
                failures = 0
            except CapsuleError as exc:
                logger.debug("host %s lifecycle stream: %s", host_id, exc)
                self.states.down(host_id, exc)
            except Exception:  # the store, most likely; the stream is opened again after a pause
                logger.exception("host %s: recording exits failed", host_id)
            await asyncio.sleep(RETRY_DELAYS_SEC[min(failures, len(RETRY_DELAYS_SEC) - 1)])
            failures += 1

    async def _follow_once(self, host_id: str) -> None:
        # Reconcile only once the watch is registered, so that no exit falls between the two.
        subscribed = asyncio.Event()
        reader = asyncio.create_task(
            self._record_exits(self._pool.client(host_id).watch_processes("", subscribed=subscribed))
        )
        waiter = asyncio.create_task(subscribed.wait())
        try:
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if subscribed.is_set():
                self.states.up(host_id)
                await self._lifecycle.reconcile_host(host_id)
            await reader
        finally:
            for task in (reader, waiter):
                task.cancel()
            await asyncio.gather(reader, waiter, return_exceptions=True)

    async def _record_exits(self, events: AsyncGenerator[ProcessEvent, None]) -> None:
        # Each write is queued as its event arrives, without waiting for the one before, so that
        # what arrives together is written together (in the order it came). A write that failed
        # ends the stream: opening it again reconciles the host, which catches up on what was lost.
        writes = _Writes()
        try:
            async with aclosing(events):
                async for event in events:
                    writes.raise_failed()
                    if event.kind is ProcessEventKind.EXITED:
                        await writes.add(self._records.record_exit(event.process, team_id=None))
                    elif event.kind in (ProcessEventKind.RESTARTED, ProcessEventKind.READY):
                        # a run its restart policy replaced, or a run that passed its readiness check
                        await writes.add(self._records.record_run(event.kind, event.process))
            await writes.finish()
        finally:
            writes.cancel()


class _Writes:
    """Record writes in flight, at most MAX_WRITES_IN_FLIGHT of them; the first failure is kept."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[bool]] = set()
        self._failure: BaseException | None = None

    async def add(self, write: Coroutine[Any, Any, bool]) -> None:
        """Queues the write (it runs up to its transaction at once); waits while too many are in flight."""
        task = asyncio.ensure_future(write)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        while len(self._tasks) >= MAX_WRITES_IN_FLIGHT:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    def _done(self, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def raise_failed(self) -> None:
        """Raises the first write's failure, if one failed."""
        if self._failure is not None:
            raise self._failure

    async def finish(self) -> None:
        """Waits for every write in flight; raises the first failure."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self.raise_failed()

    def cancel(self) -> None:
        """Stops waiting for the writes in flight (each still commits: the writer runs it to its end)."""
        for task in self._tasks:
            task.cancel()


class Reconciler:
    """Reconciles every host with the store on a slow period, retrying stops that did not finish."""

    def __init__(self, *, hosts: HostService, lifecycle: CapsuleLifecycle, interval_sec: float) -> None:
        self._hosts, self._lifecycle, self._interval = hosts, lifecycle, interval_sec

    async def run(self) -> None:
        """Reconciles every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.reconcile_once()
            except Exception:
                logger.exception("reconciling the hosts failed")

    async def reconcile_once(self) -> None:
        """Reconciles each known host once, one after the other."""
        for host_id in await self._hosts.hosts():
            await self._lifecycle.reconcile_host(host_id)


class IdleReaper:
    """Stops capsules idle longer than their timeoutSec, killing their processes."""

    def __init__(self, *, db: Database, lifecycle: CapsuleLifecycle, interval_sec: float) -> None:
        self._db, self._lifecycle, self._interval = db, lifecycle, interval_sec

    async def run(self) -> None:
        """Checks every interval until cancelled."""
        while True:
            try:
                await self.reap_once()
            except Exception:
                logger.exception("idle capsule check failed")
            await asyncio.sleep(self._interval)

    async def reap_once(self) -> list[CapsuleInfo]:
        """Stops each idle capsule this replica claims first; returns them as they are after the stop."""
        async with self._db.transaction() as session:
            claimed = [row.to_info() for row in await SystemRepository(session).claim_idle_capsules(utcnow())]
        stopped = []
        for capsule in claimed:
            logger.info("capsule %s idle for %ss: stopping it", capsule.id, capsule.timeout_sec)
            stopped.append(await self._lifecycle.stop(capsule))
        return stopped

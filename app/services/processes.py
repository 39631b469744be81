"""Background processes of one team's capsules: start, list, get, signal, stop, input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing

from app import domain
from app.domain import (
    CapsuleEvent,
    InputLimits,
    ProcessInfo,
    ProcessSpec,
    ProcessStatus,
    SignalScope,
    WaitCondition,
)
from app.errors import InvalidRequest, NotFound
from app.hosts.client import HostClient
from app.hosts.pool import HostPool
from app.services.capsules import CapsuleService
from app.services.events import decode_cursor
from app.services.feeds import EventFeeds
from app.services.records import ProcessRecords, record_to_info
from app.store import models
from app.store.repositories import ProcessEventRepository, ProcessRecordRepository
from app.store.session import Database

logger = logging.getLogger(__name__)

MAX_GRACE_SEC = 3600
MAX_WAIT_SEC = 3600


def _holds(info: ProcessInfo, until: WaitCondition) -> bool:
    """Whether a wait for `until` is over: it holds, or the process has exited."""
    return info.status is ProcessStatus.EXITED or (until is WaitCondition.READY and info.ready)


def _sort_key(info: ProcessInfo) -> tuple[bool, float]:
    return info.status is not ProcessStatus.RUNNING, -info.started_at.timestamp()


class ProcessService:
    """Process use cases for one team; built per request."""

    def __init__(
        self,
        *,
        db: Database,
        pool: HostPool,
        feeds: EventFeeds,
        capsules: CapsuleService,
        records: ProcessRecords,
        team_id: int,
        input_limits: InputLimits,
        max_processes: int,
    ) -> None:
        self._db, self._pool, self._feeds = db, pool, feeds
        self._capsules, self._records, self._team_id = capsules, records, team_id
        self._input_limits, self._max_processes = input_limits, max_processes

    async def start(self, capsule_id: str, spec: ProcessSpec) -> ProcessInfo:
        """Starts a background process and records it."""
        domain.check_process_spec(spec, self._input_limits)
        capsule = await self._capsules.require_running(capsule_id)
        info = await self._pool.client(capsule.host_id).start_process(
            capsule_id, spec, max_running=self._max_processes
        )
        await self._records.record_start(self._team_id, info)  # which logs the start, once
        return info

    async def list(self, capsule_id: str, status: ProcessStatus | None = None) -> list[ProcessInfo]:
        """Running processes first, then exited ones, newest first; records outlive the agent's memory."""
        capsule = await self._capsules.require(capsule_id)
        async with self._db.session() as session:
            records = await ProcessRecordRepository(session, self._team_id).list(capsule_id, None)
        merged = {(r.pid, r.tag): record_to_info(r) for r in records}
        # Read before the host is asked, so that a process started meanwhile is not taken for lost.
        running = [p for p in merged.values() if p.status is ProcessStatus.RUNNING]
        if capsule.status is domain.CapsuleStatus.RUNNING:
            try:
                live = await self._pool.client(capsule.host_id).list_processes(capsule_id)
            except NotFound:  # stopped meanwhile (idle, or destroyed by another request): records it is
                live = None
            if live is not None:
                # A record that has not caught up with a restart still names the earlier run's pid.
                running_by_tag = {
                    p.tag: key for key, p in merged.items() if p.status is ProcessStatus.RUNNING
                }
                for process in live:
                    stale = running_by_tag.get(process.tag)
                    if stale is not None and stale != (process.pid, process.tag):
                        merged.pop(stale, None)
                merged.update({(p.pid, p.tag): p for p in live})
                await self._records.reconcile(capsule, running=running, live=live)
        infos = [p for p in merged.values() if status is None or p.status is status]
        return sorted(infos, key=_sort_key)

    async def get(self, capsule_id: str, selector: str) -> ProcessInfo | None:
        """The process a selector names (all digits: PID; else tag), or None."""
        capsule = await self._capsules.require(capsule_id)
        key = domain.parse_selector(selector)
        if capsule.status is domain.CapsuleStatus.RUNNING:
            try:
                return await self._pool.client(capsule.host_id).get_process(capsule_id, selector)
            except NotFound:
                pass
        record = await self._record(capsule_id, key)
        return None if record is None else record_to_info(record)

    async def signal(
        self, capsule_id: str, selector: str, *, signum: signal.Signals, scope: SignalScope
    ) -> ProcessInfo:
        """Sends a signal to the process or its whole group."""
        if signum not in domain.SENDABLE_SIGNALS:
            raise InvalidRequest(f"{signum.name} cannot be sent; send one of the contract's signals")
        client = await self._host_of(capsule_id, selector)
        info = await client.signal_process(capsule_id, selector, signal=signum, scope=scope)
        logger.info("capsule %s process %s: sent %s to %s", capsule_id, info.tag, signum.name, scope.value)
        return info

    async def stop(self, capsule_id: str, selector: str, *, grace_sec: int) -> ProcessInfo:
        """SIGTERM to the group, SIGKILL after the grace period; returns once it has exited."""
        if not 0 <= grace_sec <= MAX_GRACE_SEC:
            raise InvalidRequest(f"graceSec must be between 0 and {MAX_GRACE_SEC}")
        client = await self._host_of(capsule_id, selector)
        info = await client.stop_process(capsule_id, selector, grace_sec=float(grace_sec))
        await self._records.record_exit(info, team_id=self._team_id)
        return info

    async def send_input(self, capsule_id: str, selector: str, data: bytes) -> None:
        """Writes bytes to the stdin of a process started with stdin."""
        domain.check_size("data", len(data), self._input_limits.input_bytes)
        await (await self._host_of(capsule_id, selector)).send_input(capsule_id, selector, data)

    async def close_input(self, capsule_id: str, selector: str) -> None:
        """Closes the stdin of a process started with stdin."""
        await (await self._host_of(capsule_id, selector)).close_input(capsule_id, selector)

    async def resize_terminal(self, capsule_id: str, selector: str, size: domain.TerminalSize) -> None:
        """Gives the pseudo-terminal of a process started with one a new size (it gets SIGWINCH)."""
        domain.check_terminal_size(size)
        await (await self._host_of(capsule_id, selector)).resize_terminal(capsule_id, selector, size)

    async def wait(
        self, capsule_id: str, selector: str, *, until: WaitCondition, timeout_sec: int
    ) -> ProcessInfo:
        """The process once `until` holds, it has exited, or timeout_sec has passed, whichever is first.

        Waits on the capsule's event history (bus news, the replica's poll behind it), never by asking
        the host again and again: the record is read once before and once after.
        """
        if not 0 <= timeout_sec <= MAX_WAIT_SEC:
            raise InvalidRequest(f"timeoutSec is {timeout_sec}: pass 0 to {MAX_WAIT_SEC} seconds")
        capsule = await self._capsules.require(capsule_id)
        key = domain.parse_selector(selector)
        async with self._db.session() as session:
            # The history's head first: whatever the record does not show yet comes after it.
            head, _ = await ProcessEventRepository(session, self._team_id).bounds(capsule_id)
        record = await self._record(capsule_id, key)
        if record is None:
            raise NotFound(f"no process {selector} in capsule {capsule_id}")
        found = record_to_info(record)
        if _holds(found, until) or timeout_sec == 0:
            return found
        events = self._feeds.follow(team_id=capsule.team_id, capsule_id=capsule_id, after=head)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_sec), aclosing(events):
                async for event in events:
                    if event.process.tag == found.tag and _holds(event.process, until):
                        break
        final = await self._record(capsule_id, found.tag)
        return found if final is None else record_to_info(final)

    async def events(self, capsule_id: str, after: str | None = None) -> AsyncIterator[CapsuleEvent]:
        """Lifecycle events of the capsule's processes, from every API replica, in the capsule's order:
        from now on, or every one since the event whose cursor is `after`, then live."""
        capsule = await self._capsules.require(capsule_id)
        seq = None if after is None else decode_cursor(after, capsule_id)
        events = self._feeds.follow(team_id=capsule.team_id, capsule_id=capsule_id, after=seq)
        async with aclosing(events):
            async for event in events:
                yield event

    async def _host_of(self, capsule_id: str, selector: str) -> HostClient:
        """The host client for a call on a process of this team's running capsule."""
        capsule = await self._capsules.require_running(capsule_id)
        domain.parse_selector(selector)
        return self._pool.client(capsule.host_id)

    async def _record(self, capsule_id: str, key: int | str) -> models.ProcessRecord | None:
        async with self._db.session() as session:
            repository = ProcessRecordRepository(session, self._team_id)
            if isinstance(key, int):
                return await repository.get_by_pid(capsule_id, key)
            return await repository.get_by_tag(capsule_id, key)

"""Process records: each start and exit written to the store once, with its event, and announced."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace

from app import domain
from app.bus.broadcast import Bus
from app.domain import CapsuleInfo, EventRetention, ProcessEventKind, ProcessInfo, ProcessStatus, utcnow
from app.services.events import EventLog
from app.store import models
from app.store.repositories import ProcessExitRecord, ProcessRecordRepository, SystemRepository
from app.store.session import Database

logger = logging.getLogger(__name__)

MAX_EARLY_EXITS = 1000


def record_to_info(record: models.ProcessRecord) -> ProcessInfo:
    """A stored record as the same value the agent reports."""
    return ProcessInfo(
        capsule_id=record.capsule_id,
        pid=record.pid,
        tag=record.tag,
        cmd=record.cmd,
        args=tuple(record.args),
        cwd=record.cwd or "",
        status=record.status,
        started_at=record.started_at,
        exit_code=record.exit_code,
        signal=signal.Signals[record.signal] if record.signal else None,
        timed_out=record.timed_out,
        ended_at=record.ended_at,
        terminal=record.terminal,
    )


def _exit_record(info: ProcessInfo) -> ProcessExitRecord:
    return ProcessExitRecord(
        capsule_id=info.capsule_id,
        pid=info.pid,
        tag=info.tag,
        exit_code=info.exit_code,
        signal=domain.signal_name(info.signal),
        timed_out=info.timed_out,
        ended_at=info.ended_at or utcnow(),
    )


class ProcessRecords:
    """Writes each start and exit to the store once, its event in the same transaction, and then
    announces the event on the bus.

    Writes made for a request name the team (its repository can reach nothing else); only the
    exit recorder, which follows every capsule of a host, writes across teams.
    """

    def __init__(self, *, db: Database, bus: Bus, retention: EventRetention | None = None) -> None:
        self._db = db
        self._events = EventLog(bus=bus, retention=retention or EventRetention())
        # Exits that arrived before their start was recorded, by (capsule, pid, tag). A lock per
        # process makes "insert the start, then apply a waiting exit" and "find no record, park the
        # exit" exclusive, while writes about other processes go on at the same time.
        self._early_exits: OrderedDict[tuple[str, int, str], ProcessInfo] = OrderedDict()
        self._locks: dict[tuple[str, int, str], tuple[asyncio.Lock, int]] = {}

    async def record_start(self, team_id: int, info: ProcessInfo) -> None:
        """Stores a record of a process that has just started and announces it."""
        record = models.ProcessRecord(
            team_id=team_id,
            capsule_id=info.capsule_id,
            pid=info.pid,
            tag=info.tag,
            cmd=info.cmd,
            args=list(info.args),
            cwd=info.cwd or None,
            status=ProcessStatus.RUNNING,
            started_at=info.started_at,
            terminal=info.terminal,
        )
        # The event reports the start alone, even of a process that has ended since.
        started = replace(
            info, status=ProcessStatus.RUNNING, exit_code=None, signal=None, timed_out=False, ended_at=None
        )
        async with self._locked(info):
            async with self._db.transaction() as session:
                await ProcessRecordRepository(session, team_id).add(record)
                seq = await self._events.append(
                    session, team_id=team_id, kind=ProcessEventKind.STARTED, process=started
                )
            early = self._early_exits.pop((info.capsule_id, info.pid, info.tag), None)
        await self._events.announce(info.capsule_id, seq)
        if early is not None or info.status is ProcessStatus.EXITED:  # it ended before it was recorded
            await self.record_exit(early or info, team_id=team_id)

    async def record_exit(self, info: ProcessInfo, *, team_id: int | None) -> bool:
        """Marks the process EXITED once across every replica; True for the call that did.

        team_id is the team a request acts for; None only for the exit recorder, which follows
        every team's processes on a host.
        """
        exit = _exit_record(info)
        async with self._locked(info), self._db.transaction() as session:
            if team_id is not None:
                record = await ProcessRecordRepository(session, team_id).record_exit(exit)
            else:
                system = SystemRepository(session)
                record = await system.record_exit(exit)
                if record is None and not await system.has_record(info.capsule_id, info.pid, info.tag):
                    self._park(info)
            if record is not None:
                seq = await self._events.append(
                    session,
                    team_id=record.team_id,
                    kind=ProcessEventKind.EXITED,
                    process=record_to_info(record),
                )
        if record is None:
            return False
        logger.info("capsule %s process %s (%s) exited", info.capsule_id, info.pid, info.tag)
        await self._events.announce(info.capsule_id, seq)
        return True

    @asynccontextmanager
    async def _locked(self, info: ProcessInfo) -> AsyncIterator[None]:
        key = (info.capsule_id, info.pid, info.tag)
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def _park(self, info: ProcessInfo) -> None:
        self._early_exits[(info.capsule_id, info.pid, info.tag)] = info
        while len(self._early_exits) > MAX_EARLY_EXITS:  # starts that failed to record never claim theirs
            self._early_exits.popitem(last=False)

    async def running(self, capsule: CapsuleInfo) -> list[ProcessInfo]:
        """The capsule's processes on record as RUNNING."""
        async with self._db.session() as session:
            rows = await ProcessRecordRepository(session, capsule.team_id).running(capsule.id)
        return [record_to_info(row) for row in rows]

    async def reconcile(
        self,
        capsule: CapsuleInfo,
        *,
        running: Iterable[ProcessInfo],
        live: Iterable[ProcessInfo],
        killed: bool = True,
    ) -> None:
        """Ends the records of `running` that the host's `live` list reports exited or lacks.

        running must be read before the host was asked: a process started since is missing from
        live, and would be ended while it runs. killed: the processes the host lacks were killed
        (with their capsule, or by the next agent); else nobody knows how they ended, and their
        records say no more than when.
        """
        by_key = {(p.pid, p.tag): p for p in live}
        for info in running:
            seen = by_key.get((info.pid, info.tag))
            ended = _lost(info, killed=killed) if seen is None else seen
            if ended.status is ProcessStatus.EXITED:
                await self.record_exit(ended, team_id=capsule.team_id)

    async def end_all(self, capsule: CapsuleInfo, *, killed: bool = True) -> None:
        """Ends the records of every process of a capsule its host no longer holds."""
        await self.reconcile(capsule, running=await self.running(capsule), live=(), killed=killed)


def _lost(info: ProcessInfo, *, killed: bool) -> ProcessInfo:
    """A process its host no longer knows: killed with its capsule or agent, or gone no one knows how."""
    return replace(
        info,
        status=ProcessStatus.EXITED,
        exit_code=None,
        signal=signal.SIGKILL if killed else None,
        ended_at=utcnow(),
    )

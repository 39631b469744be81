"""Process records: each start and exit written to the store once, with its event, and announced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from app import domain, metrics
from app.bus.broadcast import Bus
from app.domain import (
    CapsuleInfo,
    EventRetention,
    ProcessEvent,
    ProcessEventKind,
    ProcessInfo,
    ProcessStatus,
    utcnow,
)
from app.services.events import EventLog
from app.services.writes import Batch, RecordWriter
from app.store import models
from app.store.repositories import (
    ProcessExitRecord,
    ProcessRecordRepository,
    ProcessRunRecord,
    SystemRepository,
)
from app.store.session import Database

logger = logging.getLogger(__name__)

MAX_EARLY_EXITS = 1000
# With replicas, every replica's exit recorder sees every exit of a host. The replica that started a
# process records its exit at once; the others leave it that long, then record what is still not on
# record (its starter may be gone), so an exit costs the store one write, not one per replica.
OTHERS_EXIT_DELAY_SEC = 1.0
# One check of those takes every exit due within this share of the delay: a steady stream of exits
# costs the store a few reads a second, not one per moment exits arrived in.
DEFERRED_BATCH_SHARE = 0.25
# Starts of this replica remembered for that; an older one's exit is recorded after the delay.
MAX_STARTED_HERE = 65536


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
        restarts=record.restarts,
        ready=record.ready,
        ready_at=record.ready_at,
        oom_killed=record.oom_killed,
        usage=_usage_of(record),
    )


def _usage_of(record: models.ProcessRecord) -> domain.ResourceUsage | None:
    """The final totals an exited record keeps; None while it runs, or where they were not measured."""
    if record.cpu_sec is None or record.memory_peak_bytes is None:
        return None
    return domain.ResourceUsage(
        cpu_sec=record.cpu_sec,
        memory_bytes=record.memory_bytes or 0,
        memory_peak_bytes=record.memory_peak_bytes,
        processes=record.processes_alive or 0,
    )


def _exit_record(info: ProcessInfo) -> ProcessExitRecord:
    usage = info.usage
    return ProcessExitRecord(
        capsule_id=info.capsule_id,
        pid=info.pid,
        tag=info.tag,
        exit_code=info.exit_code,
        signal=domain.signal_name(info.signal),
        timed_out=info.timed_out,
        ended_at=info.ended_at or utcnow(),
        restarts=info.restarts,
        ready=info.ready,
        ready_at=info.ready_at,
        oom_killed=info.oom_killed,
        cpu_sec=None if usage is None else usage.cpu_sec,
        memory_bytes=None if usage is None else usage.memory_bytes,
        memory_peak_bytes=None if usage is None else usage.memory_peak_bytes,
        processes_alive=None if usage is None else usage.processes,
    )


def _only_exit(events: list[ProcessEvent]) -> ProcessInfo | None:
    """The exit, where the events of a run are its exit alone (nothing to apply before it)."""
    if len(events) == 1 and events[0].kind is ProcessEventKind.EXITED:
        return events[0].process
    return None


class ProcessRecords:
    """Writes each start and exit to the store once, its event in the same transaction, and then
    announces the event on the bus.

    Writes made for a request name the team (its repository can reach nothing else); only the
    exit recorder, which follows every capsule of a host, writes across teams.
    """

    def __init__(
        self,
        *,
        db: Database,
        bus: Bus,
        retention: EventRetention | None = None,
        others_exit_delay_sec: float = 0.0,
    ) -> None:
        """others_exit_delay_sec: how long the exit recorder leaves the exit of a process another
        replica started to that replica; 0 (one replica) records every exit at once."""
        self._db = db
        self._events = EventLog(bus=bus, retention=retention or EventRetention())
        # Events (exits, restarts, readiness) that arrived before their start was recorded, by
        # (capsule, tag): a restarted process's events name pids its start never had. The writer
        # runs one write at a time, so "insert the start, then take what waits" and "find no
        # record, park the event" never interleave; writes that arrive together share a transaction.
        self._early: OrderedDict[tuple[str, str], list[ProcessEvent]] = OrderedDict()
        # Starts of this replica whose insert has not run yet: their started_at by (capsule, tag).
        # An event of such a process that arrives meanwhile waits in _early at once, with no store
        # write of its own, and the insert takes it (it runs in the writer, which pops _early and
        # this together).
        self._starting: dict[tuple[str, str], list[datetime]] = {}
        self._writer = RecordWriter(db=db, events=self._events)
        self._others_delay = others_exit_delay_sec
        # (capsule, tag, started_at) of the processes this replica started, while they run.
        self._started_here: OrderedDict[tuple[str, str, datetime], None] = OrderedDict()
        self._deferred: list[tuple[float, ProcessInfo]] = []  # exits left to their starter, and when due
        self._deferring: asyncio.Task[None] | None = None

    @property
    def exits_left_to_others(self) -> int:
        """How many exits of processes other replicas started wait for their delay."""
        return len(self._deferred)

    async def close(self) -> None:
        """Stops checking on the exits left to other replicas (the host's next reconcile has them)."""
        if self._deferring is not None:
            self._deferring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._deferring

    async def record_start(self, team_id: int, info: ProcessInfo) -> None:
        """Stores a record of a process that has just started and announces it; an exit known by
        then (the start's own answer, or the host's event that came first) goes in with it, in the
        same transaction."""
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
            restarts=info.restarts,
            ready=info.ready,
            ready_at=info.ready_at,
        )
        # The event reports the start alone, even of a process that has ended since.
        started = replace(
            info, status=ProcessStatus.RUNNING, exit_code=None, signal=None, timed_out=False, ended_at=None
        )
        key = (info.capsule_id, info.tag)
        folded: list[ProcessInfo] = []  # the exit that went in with the start

        async def insert(batch: Batch) -> list[ProcessEvent]:  # adds only: runs no statement
            self._done_starting(key, info.started_at)
            batch.on_rollback(lambda: self._now_starting(key, info.started_at))
            parked = self._early.pop(key, None)
            if parked is not None:
                batch.on_rollback(lambda: self._early.setdefault(key, parked))
            # Parked events of an older process that had this tag are not this one's.
            mine = [e for e in parked or [] if e.process.started_at == info.started_at]
            ended = _only_exit(mine) or (info if info.status is ProcessStatus.EXITED and not mine else None)
            batch.event(team_id, ProcessEventKind.STARTED, started)
            folded.clear()
            if ended is not None:
                record.sqlmodel_update({"status": ProcessStatus.EXITED, **_exit_record(ended).columns()})
                batch.event(team_id, ProcessEventKind.EXITED, record_to_info(record))
                folded.append(ended)
            batch.add_record(record)
            return [] if ended is not None else mine

        self._now_starting(key, info.started_at)
        if self._others_delay:
            self._started_here[(info.capsule_id, info.tag, info.started_at)] = None
            while len(self._started_here) > MAX_STARTED_HERE:
                self._started_here.popitem(last=False)
        try:
            early = await self._writer.run(insert, key=key, adds_only=True)
        except BaseException:
            self._done_starting(key, info.started_at)  # where the insert ran, its rollback gave it back
            raise
        metrics.PROCESSES_STARTED.inc()
        logger.info(
            "process started: capsule %s tag %s pid %s",
            info.capsule_id,
            info.tag,
            info.pid,
            extra={"event": "process.started", "capsule": info.capsule_id, "tag": info.tag, "pid": info.pid},
        )
        if folded:
            self._exited(record, folded[0])
        for event in early:  # what happened before the start was recorded, in its order
            if event.kind is ProcessEventKind.EXITED:
                await self.record_exit(event.process, team_id=team_id)
            else:
                await self.record_run(event.kind, event.process)
        ended = folded or any(e.kind is ProcessEventKind.EXITED for e in early)
        if info.status is ProcessStatus.EXITED and not ended:  # it ended before it was recorded
            await self.record_exit(info, team_id=team_id)

    def _now_starting(self, key: tuple[str, str], started_at: datetime) -> None:
        self._starting.setdefault(key, []).append(started_at)

    def _done_starting(self, key: tuple[str, str], started_at: datetime) -> None:
        pending = self._starting.get(key, [])
        if started_at in pending:
            pending.remove(started_at)
        if not pending:
            self._starting.pop(key, None)

    def _start_waits(self, info: ProcessInfo) -> bool:
        """True when this replica's record of the process's start is still to be inserted."""
        return info.started_at in self._starting.get((info.capsule_id, info.tag), ())

    async def record_exit(self, info: ProcessInfo, *, team_id: int | None, now: bool = False) -> bool:
        """Marks the process EXITED once across every replica; True for the call that did.

        team_id is the team a request acts for; None only for the exit recorder, which follows
        every team's processes on a host. The exit recorder's exit of a process another replica
        started waits for that replica (others_exit_delay_sec), unless now.
        """
        exit = _exit_record(info)
        if team_id is None and self._start_waits(info):  # its start's insert takes it
            self._park(ProcessEvent(ProcessEventKind.EXITED, info))
            return False
        if team_id is None and self._others_delay and not now:
            run = (info.capsule_id, info.tag, info.started_at)
            started_here = run in self._started_here
            self._started_here.pop(run, None)
            if not started_here:
                self._defer(info)
                return False

        async def claimed(batch: Batch, record: models.ProcessRecord | None) -> models.ProcessRecord | None:
            if (
                record is None
                and team_id is None
                and not await SystemRepository(batch.session).has_record(info.capsule_id, info.pid, info.tag)
            ):
                self._park(ProcessEvent(ProcessEventKind.EXITED, info))
            if record is not None:
                batch.event(record.team_id, ProcessEventKind.EXITED, record_to_info(record))
            return record

        record = await self._writer.run_exit(exit, team_id=team_id, then=claimed)
        if record is None:
            return False
        self._exited(record, info)
        return True

    def _defer(self, info: ProcessInfo) -> None:
        loop = asyncio.get_running_loop()
        self._deferred.append((loop.time() + self._others_delay, info))
        if self._deferring is None or self._deferring.done():
            self._deferring = loop.create_task(self._record_deferred(), name="deferred-exits")

    async def _record_deferred(self) -> None:
        """Once each deferred exit is due: one read says which are on record already; the rest are
        recorded here."""
        loop = asyncio.get_running_loop()
        while self._deferred:
            await asyncio.sleep(max(0.0, self._deferred[0][0] - loop.time()))
            # Those due a little later come along: the starter writes an exit within milliseconds,
            # so one that is not on record by then is as missing as it will be at its due time.
            horizon = loop.time() + self._others_delay * DEFERRED_BATCH_SHARE
            due = [info for at, info in self._deferred if at <= horizon]
            try:
                async with self._db.session() as session:
                    recorded = await SystemRepository(session).exited(
                        [(info.capsule_id, info.tag, info.pid) for info in due]
                    )
                missing = [info for info in due if (info.capsule_id, info.tag, info.pid) not in recorded]
                for info in missing:
                    await self.record_exit(info, team_id=None, now=True)
            except Exception as exc:  # the store is away: try again after the delay
                logger.warning("exits left to other replicas: cannot check them yet (%s)", type(exc).__name__)
                retry = loop.time() + self._others_delay
                self._deferred = [
                    (retry, info) if at <= horizon else (at, info) for at, info in self._deferred
                ]
                continue
            self._deferred = [(at, info) for at, info in self._deferred if at > horizon]

    def _exited(self, record: models.ProcessRecord, info: ProcessInfo) -> None:
        """Counts and logs an exit this replica recorded."""
        outcome = metrics.exit_outcome(
            exit_code=record.exit_code,
            signal=record.signal,
            timed_out=record.timed_out,
            oom_killed=info.oom_killed,
        )
        metrics.PROCESSES_EXITED.labels(outcome).inc()
        logger.info(
            "process exited: capsule %s tag %s pid %s outcome %s",
            info.capsule_id,
            info.tag,
            info.pid,
            outcome,
            extra={
                "event": "process.exited",
                "capsule": info.capsule_id,
                "tag": info.tag,
                "pid": info.pid,
                "outcome": outcome,
                "exit_code": record.exit_code,
                "signal": record.signal,
            },
        )

    async def record_run(self, kind: ProcessEventKind, info: ProcessInfo) -> bool:
        """Moves the record to a later run (RESTARTED) or to ready (READY) once across every replica,
        with its event; True for the call that did. The exit recorder's, across teams."""
        run = ProcessRunRecord(
            capsule_id=info.capsule_id,
            tag=info.tag,
            pid=info.pid,
            restarts=info.restarts,
            ready=info.ready,
            ready_at=info.ready_at,
        )

        if self._start_waits(info):  # its start's insert takes it
            self._park(ProcessEvent(kind, info))
            return False

        async def advance(batch: Batch) -> models.ProcessRecord | None:
            system = SystemRepository(batch.session)
            record = await system.record_run(run)
            if record is None:
                known = await system.has_running(info.capsule_id, info.tag) or await system.has_record(
                    info.capsule_id, info.pid, info.tag
                )
                if not known:  # its start is not recorded yet
                    self._park(ProcessEvent(kind, info))
            else:
                batch.event(record.team_id, kind, record_to_info(record))
            return record

        record = await self._writer.run(advance, key=(info.capsule_id, info.tag))
        if record is None:
            return False
        if kind is ProcessEventKind.RESTARTED:  # the run it replaced ended: counted once across replicas
            metrics.PROCESSES_EXITED.labels("restarted").inc()
        logger.info(
            "capsule %s process %s (%s): %s, run %d",
            info.capsule_id,
            info.pid,
            info.tag,
            kind.value,
            info.restarts,
        )
        return True

    def _park(self, event: ProcessEvent) -> None:
        key = (event.process.capsule_id, event.process.tag)
        self._early.setdefault(key, []).append(event)
        self._early.move_to_end(key)
        while len(self._early) > MAX_EARLY_EXITS:  # starts that failed to record never claim theirs
            self._early.popitem(last=False)

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
        # A run the restart policy started since the record was written has a pid it does not know.
        by_tag = {p.tag: p for p in live if p.restarts}
        for info in running:
            seen = by_key.get((info.pid, info.tag))
            later = by_tag.get(info.tag)
            if seen is None and later is not None and later.restarts > info.restarts:
                seen = later
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

"""ProcessRecords on the real store and bus: each start and exit written once and announced once, exits
that arrive before their start, reconciling with what a host reports, and the team a write is scoped to.

The capsules here are the store's alone (on a host nothing follows), so no exit recorder or reconciler
writes to their records behind the test's back; the processes are made-up values of what an agent
reports.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from app.domain import (
    CapsuleEvent,
    CapsuleInfo,
    CapsuleStatus,
    ProcessEventKind,
    ProcessInfo,
    ProcessSpec,
    ProcessStatus,
    utcnow,
)
from app.services.records import ProcessRecords
from app.store import models
from tests.services.conftest import Teams, until
from tests.system import process_alive

pytestmark = pytest.mark.asyncio(loop_scope="module")

STARTED, EXITED = ProcessEventKind.STARTED, ProcessEventKind.EXITED
READY, RESTARTED = ProcessEventKind.READY, ProcessEventKind.RESTARTED


def running(capsule: CapsuleInfo, *, pid: int = 100, tag: str | None = None) -> ProcessInfo:
    """A process as an agent reports it when it starts."""
    return ProcessInfo(
        capsule_id=capsule.id,
        pid=pid,
        tag=tag or f"proc-{secrets.token_hex(4)}",
        cmd="sleep",
        args=("1000",),
        cwd="/workspace",
        status=ProcessStatus.RUNNING,
        started_at=utcnow(),
    )


def ended(
    info: ProcessInfo, *, exit_code: int | None = 0, signum: signal.Signals | None = None
) -> ProcessInfo:
    """The same process as an agent reports it once it has exited."""
    return replace(info, status=ProcessStatus.EXITED, exit_code=exit_code, signal=signum, ended_at=utcnow())


async def capsule_of(teams: Teams) -> CapsuleInfo:
    return await teams.stored_capsule(CapsuleStatus.RUNNING)


async def stored(teams: Teams, info: ProcessInfo) -> models.ProcessRecord:
    record = await teams.record(info.capsule_id, info.tag)
    assert record is not None, f"no record of {info.tag}"
    return record


def kinds(events: list[CapsuleEvent]) -> list[tuple[ProcessEventKind, str]]:
    return [(e.kind, e.process.tag) for e in events]


@asynccontextmanager
async def statements(teams: Teams) -> AsyncIterator[list[str]]:
    """The SQL statements the store runs meanwhile, each from its first word on."""
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(" ".join(statement.split()))

    engines = teams.state.platform.db.writing_engines
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", record)


class TestRecordStart:
    async def test_valid_is_stored_and_announced(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule, pid=4242)
        async with teams.events(capsule.id) as events:
            await records.record_start(teams.ours.team.id, info)
            seen = await events.settled()
        assert kinds(seen) == [(STARTED, info.tag)]
        assert seen[0].process == info
        record = await stored(teams, info)
        assert (record.team_id, record.pid, record.cmd, record.args, record.cwd, record.status) == (
            teams.ours.team.id,
            4242,
            "sleep",
            ["1000"],
            "/workspace",
            ProcessStatus.RUNNING,
        )
        assert record.started_at == info.started_at

    async def test_a_process_that_ended_before_it_was_recorded_is_ended_at_once(self, teams: Teams) -> None:
        capsule = await capsule_of(teams)
        info = ended(running(capsule), exit_code=6)
        async with teams.events(capsule.id) as events:
            await teams.state.platform.records.record_start(teams.ours.team.id, info)
            seen = await events.settled()
        assert kinds(seen) == [(STARTED, info.tag), (EXITED, info.tag)]
        record = await stored(teams, info)
        assert (record.status, record.exit_code) == (ProcessStatus.EXITED, 6)


class TestRecordExit:
    async def test_valid_is_stored_and_announced_once(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule)
        await records.record_start(teams.ours.team.id, info)
        exit = ended(info, exit_code=None, signum=signal.SIGTERM)
        async with teams.events(capsule.id) as events:
            assert await records.record_exit(exit, team_id=teams.ours.team.id)
            # The same exit seen again (the exit recorder, after the request that stopped it) changes nothing.
            assert not await records.record_exit(ended(info, exit_code=1), team_id=None)
            seen = await events.settled()
        assert kinds(seen) == [(EXITED, info.tag)]
        assert (seen[0].process.signal, seen[0].process.exit_code) == (signal.SIGTERM, None)
        record = await stored(teams, info)
        assert (record.status, record.exit_code, record.signal, record.ended_at) == (
            ProcessStatus.EXITED,
            None,
            "SIGTERM",
            exit.ended_at,
        )

    @pytest.mark.parametrize("replicas", [1, 2])
    async def test_concurrent_exits_one_wins(self, teams: Teams, replicas: int) -> None:
        """Two callers at once, on one replica or on two sharing the store and bus: one write, one event."""
        first = teams.state.platform.records
        second = (
            first
            if replicas == 1
            else ProcessRecords(db=teams.state.platform.db, bus=teams.state.platform.bus)
        )
        capsule = await capsule_of(teams)
        info = running(capsule)
        await first.record_start(teams.ours.team.id, info)
        async with teams.events(capsule.id) as events:
            won = await asyncio.gather(
                first.record_exit(ended(info, exit_code=1), team_id=teams.ours.team.id),
                second.record_exit(ended(info, exit_code=2), team_id=None),
            )
            seen = await events.settled()
        assert sorted(won) == [False, True]
        assert kinds(seen) == [(EXITED, info.tag)]
        # The record holds the winner's exit, and the event says the same.
        record = await stored(teams, info)
        assert record.exit_code == (1 if won[0] else 2) == seen[0].process.exit_code

    async def test_an_exit_before_its_start_is_applied_once_the_start_is_recorded(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule)
        async with teams.events(capsule.id) as events:
            # The exit recorder saw the exit before the request that started it had written its record.
            assert not await records.record_exit(ended(info, exit_code=9), team_id=None)
            assert await teams.record(capsule.id, info.tag) is None
            await records.record_start(teams.ours.team.id, info)
            seen = await events.settled()
        assert kinds(seen) == [(STARTED, info.tag), (EXITED, info.tag)]
        record = await stored(teams, info)
        assert (record.status, record.exit_code) == (ProcessStatus.EXITED, 9)

    async def test_an_exit_known_by_the_start_goes_in_with_it_in_one_write(self, teams: Teams) -> None:
        """The start's answer says it ended, or the host's exit came first: the start writes the
        record once (no UPDATE after its INSERT), with both events in order."""
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        answered, first = ended(running(capsule), exit_code=3), running(capsule)
        writes: list[str] = []
        async with teams.events(capsule.id) as events:
            async with statements(teams) as seen_statements:
                await records.record_start(teams.ours.team.id, answered)
            writes += seen_statements
            assert not await records.record_exit(ended(first, exit_code=5), team_id=None)
            async with statements(teams) as seen_statements:
                await records.record_start(teams.ours.team.id, first)
            writes += seen_statements
            seen = await events.settled()
        assert kinds(seen) == [(kind, info.tag) for info in (answered, first) for kind in (STARTED, EXITED)]
        assert [e.seq for e in seen] == list(range(seen[0].seq, seen[0].seq + 4))
        assert (seen[1].process.exit_code, seen[3].process.exit_code) == (3, 5)
        written = [  # on PostgreSQL the INSERT is a part of the events' statement
            "INSERT" if "INSERT INTO process_record" in s else s.split()[0]
            for s in writes
            if "process_record" in s.split("WHERE")[0] and s[0] != "S"
        ]
        assert written == ["INSERT", "INSERT"], writes
        for info, code in ((answered, 3), (first, 5)):
            record = await stored(teams, info)
            assert (record.status, record.exit_code) == (ProcessStatus.EXITED, code)
            assert record.ended_at is not None

    async def test_an_exit_while_the_start_waits_to_be_written_waits_with_no_write_of_its_own(
        self, teams: Teams
    ) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule)
        async with teams.events(capsule.id) as events, statements(teams) as seen_statements:
            start = asyncio.create_task(records.record_start(teams.ours.team.id, info))
            await asyncio.sleep(0)  # the start is queued for the writer, its insert not yet run
            assert not await records.record_exit(ended(info, exit_code=8), team_id=None)
            assert seen_statements == []
            await start
            seen = await events.settled()
        assert kinds(seen) == [(STARTED, info.tag), (EXITED, info.tag)]
        assert (await stored(teams, info)).exit_code == 8

    async def test_an_older_processs_exit_while_a_start_with_its_tag_waits_is_recorded(
        self, teams: Teams
    ) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        older = running(capsule, pid=1)
        await records.record_start(teams.ours.team.id, older)
        # The older process with this tag ended and a new one took the tag; its exit comes late.
        newer = replace(running(capsule, pid=2, tag=older.tag), started_at=utcnow())
        start = asyncio.create_task(records.record_start(teams.ours.team.id, newer))
        await asyncio.sleep(0)
        assert await records.record_exit(ended(older, exit_code=1), team_id=None)
        await start
        async with teams.state.platform.db.session() as session:
            rows = (
                await session.exec(
                    select(models.ProcessRecord).where(
                        col(models.ProcessRecord.capsule_id) == capsule.id,
                        col(models.ProcessRecord.tag) == older.tag,
                    )
                )
            ).all()
        assert sorted((r.pid, r.status) for r in rows) == [
            (1, ProcessStatus.EXITED),
            (2, ProcessStatus.RUNNING),
        ]

    async def test_another_teams_record_cannot_be_ended(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule)
        await records.record_start(teams.ours.team.id, info)
        async with teams.events(capsule.id) as events:
            assert not await records.record_exit(ended(info), team_id=teams.theirs.team.id)
            seen = await events.settled()
        assert seen == []
        assert (await stored(teams, info)).status is ProcessStatus.RUNNING
        # Nor is the exit kept for later, as one that came before its start would be.
        assert await records.record_exit(ended(info, exit_code=4), team_id=teams.ours.team.id)
        assert (await stored(teams, info)).exit_code == 4


class TestReconcile:
    async def test_killed_ends_what_the_host_no_longer_knows_with_sigkill(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        alive, gone, done = running(capsule, pid=1), running(capsule, pid=2), running(capsule, pid=3)
        for info in (alive, gone, done):
            await records.record_start(teams.ours.team.id, info)
        await records.reconcile(
            capsule, running=await records.running(capsule), live=[alive, ended(done, exit_code=7)]
        )
        assert (await stored(teams, alive)).status is ProcessStatus.RUNNING
        lost = await stored(teams, gone)
        assert (lost.status, lost.exit_code, lost.signal) == (ProcessStatus.EXITED, None, "SIGKILL")
        assert lost.ended_at is not None
        finished = await stored(teams, done)
        assert (finished.status, finished.exit_code, finished.signal) == (ProcessStatus.EXITED, 7, None)

    async def test_not_killed_says_no_more_than_when(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule)
        await records.record_start(teams.ours.team.id, info)
        before = utcnow()
        await records.reconcile(capsule, running=await records.running(capsule), live=[], killed=False)
        lost = await stored(teams, info)
        assert (lost.status, lost.exit_code, lost.signal) == (ProcessStatus.EXITED, None, None)
        assert lost.ended_at is not None and lost.ended_at >= before

    async def test_only_the_capsules_own_records(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule, other = await capsule_of(teams), await capsule_of(teams)
        mine, elsewhere = running(capsule), running(other)
        for info in (mine, elsewhere):
            await records.record_start(teams.ours.team.id, info)
        await records.end_all(capsule)
        assert (await stored(teams, mine)).status is ProcessStatus.EXITED
        assert (await stored(teams, elsewhere)).status is ProcessStatus.RUNNING

    async def test_a_process_started_after_the_host_was_asked_is_left_running(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await teams.capsule()
        # As ProcessService.list and the reconciler do: the records first, then the host; a start by
        # another request lands between the host's answer and the reconcile.
        running_before = await records.running(capsule)
        live = await teams.host.list_processes(capsule.id)
        info = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="sleep", args=("1000",)))
        await records.reconcile(capsule, running=running_before, live=live)
        assert process_alive(info)
        assert (await stored(teams, info)).status is ProcessStatus.RUNNING

    async def test_a_list_racing_starts_ends_no_running_process(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        spec = ProcessSpec(cmd="sleep", args=("1000",))
        async with asyncio.timeout(30):
            for _ in range(3):  # the capsule's process limit in these tests
                started, _ = await asyncio.gather(
                    teams.ours.processes.start(capsule.id, spec), teams.ours.processes.list(capsule.id)
                )
                assert (await stored(teams, started)).status is ProcessStatus.RUNNING


class TestRecordRun:
    """READY and RESTARTED: the record follows a process's runs (pid, restarts, ready), once."""

    async def test_ready_then_a_restart_then_the_exit_each_once(self, teams: Teams) -> None:
        records = teams.state.platform.records
        other = ProcessRecords(db=teams.state.platform.db, bus=teams.state.platform.bus)  # a replica
        capsule = await capsule_of(teams)
        info = replace(running(capsule, pid=10), ready=False)
        await records.record_start(teams.ours.team.id, info)
        ready = replace(info, ready=True, ready_at=utcnow())
        restarted = replace(info, pid=11, restarts=1, ready=False)
        async with teams.events(capsule.id) as events:
            assert sorted(await asyncio.gather(*(r.record_run(READY, ready) for r in (records, other)))) == [
                False,
                True,
            ]
            won = await asyncio.gather(*(r.record_run(RESTARTED, restarted) for r in (records, other)))
            assert sorted(won) == [False, True]
            assert not await records.record_run(READY, ready)  # the first run's, seen late: no change
            assert await records.record_exit(ended(restarted, exit_code=3), team_id=None)
            seen = await events.settled()
        assert kinds(seen) == [(READY, info.tag), (RESTARTED, info.tag), (EXITED, info.tag)]
        assert seen[0].process.ready and seen[0].process.ready_at == ready.ready_at
        assert (seen[1].process.pid, seen[1].process.restarts, seen[1].process.ready) == (11, 1, False)
        record = await stored(teams, info)
        assert (record.pid, record.restarts, record.status, record.exit_code) == (
            11,
            1,
            ProcessStatus.EXITED,
            3,
        )

    async def test_a_restart_before_its_start_is_applied_once_the_start_is_recorded(
        self, teams: Teams
    ) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule, pid=20)
        async with teams.events(capsule.id) as events:
            # It crashed and came back before the request that started it had written its record.
            assert not await records.record_run(RESTARTED, replace(info, pid=21, restarts=1))
            # An older process that had this tag left one too: not this one's (another start time).
            stale = replace(info, pid=5, restarts=3, started_at=info.started_at.replace(year=2020))
            assert not await records.record_run(RESTARTED, stale)
            await records.record_start(teams.ours.team.id, info)
            seen = await events.settled()
        assert kinds(seen) == [(STARTED, info.tag), (RESTARTED, info.tag)]
        record = await stored(teams, info)
        assert (record.pid, record.restarts, record.status) == (21, 1, ProcessStatus.RUNNING)

    async def test_reconcile_takes_a_restarted_run_for_the_same_process(self, teams: Teams) -> None:
        records = teams.state.platform.records
        capsule = await capsule_of(teams)
        info = running(capsule, pid=30)
        await records.record_start(teams.ours.team.id, info)
        later = replace(info, pid=31, restarts=2)
        await records.reconcile(capsule, running=await records.running(capsule), live=[later])
        assert (await stored(teams, info)).status is ProcessStatus.RUNNING  # not lost: restarted
        await records.reconcile(
            capsule, running=await records.running(capsule), live=[ended(later, exit_code=1)]
        )
        record = await stored(teams, info)
        assert (record.status, record.pid, record.restarts, record.exit_code) == (
            ProcessStatus.EXITED,
            31,
            2,
            1,
        )


class TestExitsOfOtherReplicas:
    """With replicas, each leaves the exit of a process another started to that one, which records it
    at once: an exit is one write to the store, not one per replica."""

    @asynccontextmanager
    async def replicas(self, teams: Teams) -> AsyncIterator[tuple[ProcessRecords, ProcessRecords]]:
        platform = teams.state.platform
        starter, other = (
            ProcessRecords(db=platform.db, bus=platform.bus, others_exit_delay_sec=0.2) for _ in range(2)
        )
        try:
            yield starter, other
        finally:
            await starter.close()
            await other.close()

    async def test_the_starter_records_it_and_the_other_writes_nothing(self, teams: Teams) -> None:
        capsule = await capsule_of(teams)
        info = running(capsule)
        exit = ended(info, exit_code=4)
        async with self.replicas(teams) as (starter, other):
            await starter.record_start(teams.ours.team.id, info)
            async with teams.events(capsule.id) as events, statements(teams) as seen:
                assert not await other.record_exit(exit, team_id=None)  # left to its starter
                assert await starter.record_exit(exit, team_id=None)
                await until(lambda: _done(other.exits_left_to_others == 0), what="the other replica's check")
                recorded = await events.settled()
        assert kinds(recorded) == [(EXITED, info.tag)]
        assert len([s for s in seen if s.startswith("UPDATE process_record")]) == 1
        assert (await stored(teams, info)).exit_code == 4

    async def test_one_its_starter_did_not_record_is_recorded_after_the_delay(self, teams: Teams) -> None:
        capsule = await capsule_of(teams)
        info = running(capsule)
        async with self.replicas(teams) as (starter, other):
            await starter.record_start(teams.ours.team.id, info)
            async with teams.events(capsule.id) as events:
                # The starter went away before its exit recorder saw the exit.
                assert not await other.record_exit(ended(info, exit_code=6), team_id=None)
                assert (await stored(teams, info)).status is ProcessStatus.RUNNING

                async def exited() -> bool | None:
                    return (await stored(teams, info)).status is ProcessStatus.EXITED or None

                await until(exited, what=f"the exit of {info.tag}")
                recorded = await events.settled()
        assert kinds(recorded) == [(EXITED, info.tag)]
        assert (await stored(teams, info)).exit_code == 6

    async def test_exits_left_to_others_are_checked_together(self, teams: Teams) -> None:
        capsule = await capsule_of(teams)
        infos = [running(capsule, pid=500 + n) for n in range(10)]
        platform = teams.state.platform
        # The ten exits below come in well within the delay, even on a loaded machine.
        starter, other = (
            ProcessRecords(db=platform.db, bus=platform.bus, others_exit_delay_sec=2.0) for _ in range(2)
        )
        try:
            for info in infos:
                await starter.record_start(teams.ours.team.id, info)
            async with statements(teams) as seen:
                for info in infos:  # one after another, as a host's exits come in
                    assert not await other.record_exit(ended(info), team_id=None)
                    assert await starter.record_exit(ended(info), team_id=None)
                await until(lambda: _done(other.exits_left_to_others == 0), what="the other replica's check")
        finally:
            await starter.close()
            await other.close()
        checks = [s for s in seen if s.startswith("SELECT process_record.capsule_id, process_record.tag")]
        assert len(checks) == 1, checks

    async def test_one_replica_records_every_exit_at_once(self, teams: Teams) -> None:
        records = teams.state.platform.records  # the memory bus: this server is the only replica
        capsule = await capsule_of(teams)
        info = running(capsule)
        await ProcessRecords(db=teams.state.platform.db, bus=teams.state.platform.bus).record_start(
            teams.ours.team.id, info
        )
        assert await records.record_exit(ended(info), team_id=None)


async def _done(value: bool) -> bool | None:
    return value or None

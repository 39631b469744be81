"""Repositories on both databases: team scoping, ordering, and the exactly-once updates."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from app.domain import CapsuleLimits, CapsuleRuntime, CapsuleStatus, ProcessStatus, utcnow
from app.store import models
from app.store.repositories import (
    CapsuleRepository,
    HostRepository,
    ProcessExitRecord,
    ProcessRecordRepository,
    SystemRepository,
)
from app.store.session import Database
from tests.factories import make_capsule, make_process_record, make_team


def _id(team: models.Team) -> int:
    assert team.id is not None
    return team.id


class TestCapsuleRepository:
    async def test_another_teams_capsule_is_invisible(self, database: Database) -> None:
        mine, theirs = await make_team(database), await make_team(database)
        own = await make_capsule(database, mine)
        other = await make_capsule(database, theirs)
        async with database.session() as session:
            capsules = CapsuleRepository(session, _id(mine))
            assert await capsules.get(other.id) is None
            assert (await capsules.get(own.id)) == own
            assert [c.id for c in await capsules.list()] == [own.id]

    async def test_list_is_newest_first(self, database: Database) -> None:
        team = await make_team(database)
        now = utcnow()
        old = await make_capsule(database, team, created_at=now - timedelta(minutes=5))
        new = await make_capsule(database, team, created_at=now)
        async with database.session() as session:
            listed = await CapsuleRepository(session, _id(team)).list()
        assert [c.id for c in listed] == [new.id, old.id]

    async def test_add_refuses_another_teams_row(self, database: Database) -> None:
        mine, theirs = await make_team(database), await make_team(database)
        capsule = models.Capsule(id="cap-x", team_id=_id(theirs), host_id="h1", status=CapsuleStatus.RUNNING)
        async with database.transaction() as session:
            with pytest.raises(ValueError, match="team"):
                await CapsuleRepository(session, _id(mine)).add(capsule)

    async def test_add_flushes_and_the_service_commits(self, database: Database) -> None:
        team = await make_team(database)
        capsule = models.Capsule(id="cap-new", team_id=_id(team), host_id="h1", status=CapsuleStatus.STARTING)
        async with database.transaction() as session:
            await CapsuleRepository(session, _id(team)).add(capsule)
        async with database.session() as session:
            stored = await CapsuleRepository(session, _id(team)).get("cap-new")
        assert stored is not None
        assert stored.status is CapsuleStatus.STARTING

    async def test_runtime_network_and_limits_round_trip(self, database: Database) -> None:
        team = await make_team(database)
        capsule = models.Capsule(
            id="cap-spec",
            team_id=_id(team),
            host_id="h1",
            status=CapsuleStatus.STARTING,
            network=True,
            max_processes=32,
            memory_mib=128,
            cpus=0.5,
        )
        async with database.transaction() as session:
            await CapsuleRepository(session, _id(team)).add(capsule)
        async with database.session() as session:
            stored = await CapsuleRepository(session, _id(team)).get("cap-spec")
        assert stored is not None
        assert (stored.runtime, stored.network) == (None, True)
        assert (stored.max_processes, stored.memory_mib, stored.cpus) == (32, 128, 0.5)
        # Until its host has answered, the capsule claims no isolation.
        info = stored.to_info()
        assert info.runtime is CapsuleRuntime.PLAIN
        assert (info.network, info.limits) == (
            True,
            CapsuleLimits(max_processes=32, memory_mib=128, cpus=0.5),
        )

    async def test_set_status_records_the_runtime_the_host_reported(self, database: Database) -> None:
        team = await make_team(database)
        capsule = await make_capsule(database, team, status=CapsuleStatus.STARTING)
        async with database.transaction() as session:
            running = await CapsuleRepository(session, _id(team)).set_status(
                capsule.id, CapsuleStatus.RUNNING, runtime=CapsuleRuntime.SANDBOX
            )
        assert running is not None and running.runtime is CapsuleRuntime.SANDBOX
        # A change of status alone leaves the runtime as it was.
        async with database.transaction() as session:
            await CapsuleRepository(session, _id(team)).set_status(capsule.id, CapsuleStatus.STOPPING)
        async with database.session() as session:
            stored = await CapsuleRepository(session, _id(team)).get(capsule.id)
        assert stored is not None
        assert (stored.status, stored.runtime) == (CapsuleStatus.STOPPING, CapsuleRuntime.SANDBOX)

    async def test_a_capsule_made_without_a_spec_has_the_defaults(self, database: Database) -> None:
        stored = (await make_capsule(database, await make_team(database))).to_info()
        assert (stored.network, stored.limits) == (False, CapsuleLimits(max_processes=256))


class TestProcessRecordRepository:
    async def test_another_teams_records_are_invisible(self, database: Database) -> None:
        mine, theirs = await make_team(database), await make_team(database)
        capsule = await make_capsule(database, theirs)
        await make_process_record(database, capsule, pid=7, tag="web")
        async with database.session() as session:
            records = ProcessRecordRepository(session, _id(mine))
            assert await records.list(capsule.id) == []
            assert await records.get_by_pid(capsule.id, 7) is None
            assert await records.get_by_tag(capsule.id, "web") is None

    async def test_list_puts_running_first_then_newest(self, database: Database) -> None:
        team = await make_team(database)
        capsule = await make_capsule(database, team)
        now = utcnow()
        old_running = await make_process_record(
            database, capsule, pid=1, started_at=now - timedelta(minutes=3)
        )
        new_exited = await make_process_record(
            database, capsule, pid=2, status=ProcessStatus.EXITED, exit_code=0, started_at=now, ended_at=now
        )
        old_exited = await make_process_record(
            database, capsule, pid=3, status=ProcessStatus.EXITED, started_at=now - timedelta(minutes=9)
        )
        new_running = await make_process_record(
            database, capsule, pid=4, started_at=now - timedelta(minutes=1)
        )
        async with database.session() as session:
            records = ProcessRecordRepository(session, _id(team))
            everything = await records.list(capsule.id, None)
            exited = await records.list(capsule.id, ProcessStatus.EXITED)
            running = await records.list(capsule.id, ProcessStatus.RUNNING)
        assert [r.pid for r in everything] == [
            new_running.pid,
            old_running.pid,
            new_exited.pid,
            old_exited.pid,
        ]
        assert [r.pid for r in exited] == [new_exited.pid, old_exited.pid]
        assert [r.pid for r in running] == [new_running.pid, old_running.pid]
        assert everything[0].args == ["30"]

    async def test_get_by_pid_and_tag_return_the_newest(self, database: Database) -> None:
        team = await make_team(database)
        capsule = await make_capsule(database, team)
        now = utcnow()
        await make_process_record(
            database,
            capsule,
            pid=9,
            tag="job",
            status=ProcessStatus.EXITED,
            started_at=now - timedelta(hours=1),
        )
        newest = await make_process_record(database, capsule, pid=9, tag="job", started_at=now)
        async with database.session() as session:
            records = ProcessRecordRepository(session, _id(team))
            by_pid = await records.get_by_pid(capsule.id, 9)
            by_tag = await records.get_by_tag(capsule.id, "job")
            assert await records.get_by_pid(capsule.id, 10) is None
            assert await records.get_by_tag(capsule.id, "nope") is None
        assert by_pid is not None and by_pid.id == newest.id
        assert by_tag is not None and by_tag.id == newest.id


def exit_of(
    capsule: models.Capsule,
    *,
    pid: int,
    tag: str,
    exit_code: int | None = 0,
    signal: str | None = None,
    timed_out: bool = False,
) -> ProcessExitRecord:
    return ProcessExitRecord(
        capsule_id=capsule.id,
        pid=pid,
        tag=tag,
        exit_code=exit_code,
        signal=signal,
        timed_out=timed_out,
        ended_at=utcnow(),
    )


class TestRecordExit:
    async def test_exactly_one_concurrent_caller_wins(self, database: Database) -> None:
        team = await make_team(database)
        capsule = await make_capsule(database, team)
        record = await make_process_record(database, capsule, pid=42, tag="worker")
        ended = utcnow()

        async def record_exit(exit_code: int) -> models.ProcessRecord | None:
            async with database.transaction() as session:
                return await SystemRepository(session).record_exit(
                    ProcessExitRecord(
                        capsule_id=capsule.id,
                        pid=42,
                        tag="worker",
                        exit_code=exit_code,
                        signal=None,
                        timed_out=False,
                        ended_at=ended,
                    )
                )

        async with asyncio.timeout(30):
            results = await asyncio.gather(*(record_exit(code) for code in range(8)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        winner = winners[0]
        assert (winner.id, winner.status, winner.ended_at) == (record.id, ProcessStatus.EXITED, ended)
        async with database.session() as session:
            stored = await ProcessRecordRepository(session, _id(team)).get_by_tag(capsule.id, "worker")
        assert stored is not None
        assert (stored.status, stored.exit_code) == (ProcessStatus.EXITED, winner.exit_code)

    async def test_records_signal_and_timeout(self, database: Database) -> None:
        team = await make_team(database)
        capsule = await make_capsule(database, team)
        await make_process_record(database, capsule, pid=5, tag="slow")
        async with database.transaction() as session:
            record = await ProcessRecordRepository(session, _id(team)).record_exit(
                exit_of(capsule, pid=5, tag="slow", exit_code=None, signal="SIGKILL", timed_out=True)
            )
        assert record is not None
        assert (record.exit_code, record.signal, record.timed_out) == (None, "SIGKILL", True)

    async def test_unknown_process_is_none(self, database: Database) -> None:
        team = await make_team(database)
        capsule = await make_capsule(database, team)
        await make_process_record(database, capsule, pid=5, tag="a")
        async with database.transaction() as session:
            # The PID was reused by another process.
            record = await SystemRepository(session).record_exit(exit_of(capsule, pid=5, tag="b"))
        assert record is None

    async def test_a_team_cannot_end_another_teams_process(self, database: Database) -> None:
        owner, other = await make_team(database), await make_team(database)
        capsule = await make_capsule(database, owner)
        await make_process_record(database, capsule, pid=5, tag="a")
        async with database.transaction() as session:
            assert (
                await ProcessRecordRepository(session, _id(other)).record_exit(
                    exit_of(capsule, pid=5, tag="a")
                )
                is None
            )
            assert await ProcessRecordRepository(session, _id(other)).running(capsule.id) == []
            mine = await ProcessRecordRepository(session, _id(owner)).running(capsule.id)
            assert [r.tag for r in mine] == ["a"]


class TestSystemRepository:
    async def test_capsules_to_reconcile(self, database: Database) -> None:
        team = await make_team(database)
        running = await make_capsule(database, team, host_id="h1")
        stopping = await make_capsule(database, team, host_id="h1", status=CapsuleStatus.STOPPING)
        stopped_with_leftover = await make_capsule(database, team, host_id="h1", status=CapsuleStatus.STOPPED)
        stopped_but_hosted = await make_capsule(database, team, host_id="h1", status=CapsuleStatus.STOPPED)
        await make_capsule(database, team, host_id="h1", status=CapsuleStatus.STOPPED)
        await make_capsule(database, team, host_id="h2")
        await make_process_record(database, running, pid=1)
        await make_process_record(database, stopped_with_leftover, pid=3)
        async with database.session() as session:
            rows = await SystemRepository(session).capsules_to_reconcile(
                "h1", {stopped_but_hosted.id, "cap-x"}
            )
        expected = [running.id, stopping.id, stopped_with_leftover.id, stopped_but_hosted.id]
        assert [r.id for r in rows] == sorted(expected)

    async def test_idle_capsules_and_claims(self, database: Database) -> None:
        team = await make_team(database)
        now = utcnow()
        idle = await make_capsule(database, team, timeout_sec=60, last_active_at=now - timedelta(seconds=61))
        await make_capsule(database, team, timeout_sec=60, last_active_at=now - timedelta(seconds=59))
        await make_capsule(
            database,
            team,
            timeout_sec=1,
            last_active_at=now - timedelta(hours=1),
            status=CapsuleStatus.STOPPED,
        )
        async with database.session() as session:
            assert [c.id for c in await SystemRepository(session).idle_capsules(now)] == [idle.id]

        async def claim() -> list[str]:
            async with database.transaction() as session:
                return [c.id for c in await SystemRepository(session).claim_idle_capsules(now)]

        async with asyncio.timeout(30):
            claims = await asyncio.gather(*(claim() for _ in range(4)))
        assert sorted(claims, key=len) == [[], [], [], [idle.id]]
        async with database.session() as session:
            stored = await CapsuleRepository(session, _id(team)).get(idle.id)
        assert stored is not None and stored.status is CapsuleStatus.STOPPING


class TestCapsuleStatusAndTouch:
    async def test_set_status_and_touch(self, database: Database) -> None:
        team, other = await make_team(database), await make_team(database)
        then = utcnow() - timedelta(minutes=1)
        capsule = await make_capsule(database, team, last_active_at=then)
        now = utcnow()
        async with database.transaction() as session:
            capsules = CapsuleRepository(session, _id(team))
            assert await capsules.set_status(capsule.id, CapsuleStatus.STOPPED, only_from=[]) is None
            updated = await capsules.set_status(capsule.id, CapsuleStatus.STOPPING)
            assert await capsules.set_status("cap-missing", CapsuleStatus.STOPPED) is None
            assert await capsules.touch(capsule.id, now) is True
            assert await capsules.touch(capsule.id, then) is False  # never moves back
            others = CapsuleRepository(session, _id(other))
            assert await others.set_status(capsule.id, CapsuleStatus.STOPPED) is None
            assert await others.touch(capsule.id, now + timedelta(seconds=1)) is False
        assert updated is not None and updated.status is CapsuleStatus.STOPPING
        async with database.session() as session:
            stored = await CapsuleRepository(session, _id(team)).get(capsule.id)
        assert stored is not None
        assert (stored.status, stored.last_active_at) == (CapsuleStatus.STOPPING, now)


class TestHostRepository:
    async def test_upsert_list_get_and_counts(self, database: Database) -> None:
        async with database.transaction() as session:
            hosts = HostRepository(session)
            first = await hosts.upsert("h2", "127.0.0.1:7001")
            await hosts.upsert("h1", "127.0.0.1:7000")
            moved = await hosts.upsert("h2", "127.0.0.1:7002")
        assert (first.id, moved.address) == ("h2", "127.0.0.1:7002")
        team = await make_team(database)
        await make_capsule(database, team, host_id="h1")
        await make_capsule(database, team, host_id="h1", status=CapsuleStatus.STARTING)
        await make_capsule(database, team, host_id="h2", status=CapsuleStatus.STOPPED)
        async with database.session() as session:
            hosts = HostRepository(session)
            assert [(h.id, h.address) for h in await hosts.list()] == [
                ("h1", "127.0.0.1:7000"),
                ("h2", "127.0.0.1:7002"),
            ]
            stored = await hosts.get("h2")
            assert stored is not None and stored.address == "127.0.0.1:7002"
            assert await hosts.get("h3") is None
            assert await hosts.active_capsule_counts() == {"h1": 2}

"""The capsule lifecycle against a real agent and a real store: stops the host confirms, the idle reaper,
the reconciler that brings host and store into agreement, and the exit recorder."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from app.agent.server import AgentHandle, start_agent
from app.bus.broadcast import Bus
from app.config import Settings
from app.domain import (
    CapsuleInfo,
    CapsuleStatus,
    ProcessInfo,
    ProcessSpec,
    ProcessStatus,
    SignalScope,
    utcnow,
)
from app.errors import Internal
from app.hosts.client import HostClient
from app.hosts.pool import HostPool
from app.services.hosts import HostService
from app.services.lifecycle import CapsuleLifecycle, ExitRecorder, IdleReaper, Reconciler
from app.services.records import ProcessRecords
from app.store import models
from app.store.repositories import CapsuleRepository, ProcessRecordRepository
from app.store.session import Database
from tests.factories import make_capsule, make_team
from tests.system import free_port, process_alive

DEADLINE = 20


@dataclass
class World:
    """A real agent on loopback as host h1, the store, and the lifecycle that joins them."""

    db: Database
    pool: HostPool
    agent: AgentHandle
    records: ProcessRecords
    lifecycle: CapsuleLifecycle
    team: models.Team

    @property
    def client(self) -> HostClient:
        return self.pool.client("h1")

    def cut_off(self) -> None:
        """The host stops answering: its address now leads to a port nobody listens on."""
        self.pool.set_hosts({"h1": f"127.0.0.1:{free_port()}"})

    def reconnect(self) -> None:
        self.pool.set_hosts({"h1": f"127.0.0.1:{self.agent.port}"})

    async def capsule(self, capsule_id: str) -> CapsuleInfo:
        assert self.team.id is not None
        async with self.db.session() as session:
            row = await CapsuleRepository(session, self.team.id).get(capsule_id)
        assert row is not None
        return row.to_info()

    async def record(self, capsule_id: str, tag: str) -> models.ProcessRecord:
        assert self.team.id is not None
        async with self.db.session() as session:
            row = await ProcessRecordRepository(session, self.team.id).get_by_tag(capsule_id, tag)
        assert row is not None
        return row

    async def place(self, *, timeout_sec: int = 300, last_active_at: datetime | None = None) -> CapsuleInfo:
        """A capsule of the team, placed on the host and RUNNING there."""
        row = await make_capsule(
            self.db,
            self.team,
            status=CapsuleStatus.STARTING,
            timeout_sec=timeout_sec,
            last_active_at=last_active_at,
        )
        return await self.lifecycle.place(row.to_info())

    async def start(self, capsule: CapsuleInfo, tag: str = "sleeper") -> ProcessInfo:
        """A background process on the host, recorded as a request would record it."""
        info = await self.client.start_process(capsule.id, ProcessSpec(cmd="sleep", args=("1000",), tag=tag))
        await self.records.record_start(capsule.team_id, info)
        return info


@pytest.fixture
async def world(database: Database, settings: Settings, agent: AgentHandle) -> AsyncIterator[World]:
    bus = Bus("memory://")
    await bus.connect()
    pool = HostPool(settings)
    pool.set_hosts({"h1": f"127.0.0.1:{agent.port}"})
    records = ProcessRecords(db=database, bus=bus)
    try:
        yield World(
            db=database,
            pool=pool,
            agent=agent,
            records=records,
            lifecycle=CapsuleLifecycle(db=database, pool=pool, records=records),
            team=await make_team(database),
        )
    finally:
        await pool.close()
        await bus.disconnect()


class TestPlace:
    async def test_valid(self, world: World) -> None:
        capsule = await world.place()
        assert capsule.status is CapsuleStatus.RUNNING
        assert capsule.id in {c.capsule_id for c in await world.client.list_capsules()}

    async def test_host_unreachable_is_error(self, world: World) -> None:
        world.cut_off()
        row = await make_capsule(world.db, world.team, status=CapsuleStatus.STARTING)
        with pytest.raises(Exception, match="cannot be reached"):
            await world.lifecycle.place(row.to_info())
        assert (await world.capsule(row.id)).status is CapsuleStatus.ERROR


class TestStop:
    async def test_valid(self, world: World) -> None:
        capsule = await world.place()
        process = await world.start(capsule)
        stopped = await world.lifecycle.stop(capsule)
        assert stopped.status is CapsuleStatus.STOPPED
        assert not process_alive(process)
        record = await world.record(capsule.id, "sleeper")
        assert record.status is ProcessStatus.EXITED and record.ended_at is not None
        assert capsule.id not in {c.capsule_id for c in await world.client.list_capsules()}

    async def test_stopped_stays_stopped(self, world: World) -> None:
        capsule = await world.lifecycle.stop(await world.place())
        again = await world.lifecycle.stop(capsule)
        assert again == await world.capsule(capsule.id)
        assert again.status is CapsuleStatus.STOPPED

    async def test_host_unreachable_stays_stopping_until_it_answers(self, world: World) -> None:
        capsule = await world.place()
        process = await world.start(capsule)
        world.cut_off()
        pending = await world.lifecycle.stop(capsule)
        # Nothing is written that the host has not confirmed: the process still runs, and says so.
        assert pending.status is CapsuleStatus.STOPPING
        assert process_alive(process)
        assert (await world.record(capsule.id, "sleeper")).status is ProcessStatus.RUNNING
        world.reconnect()
        await world.lifecycle.reconcile_host("h1")
        assert (await world.capsule(capsule.id)).status is CapsuleStatus.STOPPED
        assert not process_alive(process)
        assert (await world.record(capsule.id, "sleeper")).status is ProcessStatus.EXITED


class TestIdleReaper:
    async def test_host_unreachable_stops_on_paper_never(self, world: World) -> None:
        capsule = await world.place(timeout_sec=1, last_active_at=utcnow() - timedelta(minutes=1))
        process = await world.start(capsule)
        reaper = IdleReaper(db=world.db, lifecycle=world.lifecycle, interval_sec=60)
        world.cut_off()
        [claimed] = await reaper.reap_once()
        assert claimed.id == capsule.id and claimed.status is CapsuleStatus.STOPPING
        assert process_alive(process)
        assert (await world.record(capsule.id, "sleeper")).status is ProcessStatus.RUNNING
        assert await reaper.reap_once() == []  # claimed once; the reconciler retries the stop
        world.reconnect()
        hosts = HostService(world.db, {"h1": f"127.0.0.1:{world.agent.port}"})
        await Reconciler(hosts=hosts, lifecycle=world.lifecycle, interval_sec=60).reconcile_once()
        assert (await world.capsule(capsule.id)).status is CapsuleStatus.STOPPED
        assert not process_alive(process)

    async def test_valid(self, world: World) -> None:
        idle = await world.place(timeout_sec=1, last_active_at=utcnow() - timedelta(minutes=1))
        busy = await world.place(timeout_sec=600)
        process = await world.start(idle)
        reaper = IdleReaper(db=world.db, lifecycle=world.lifecycle, interval_sec=60)
        assert [c.id for c in await reaper.reap_once()] == [idle.id]
        assert (await world.capsule(idle.id)).status is CapsuleStatus.STOPPED
        assert (await world.capsule(busy.id)).status is CapsuleStatus.RUNNING
        assert not process_alive(process)


class TestReconcileHost:
    async def test_a_stopped_capsule_the_host_still_holds_is_destroyed(self, world: World) -> None:
        capsule = await world.place()
        process = await world.start(capsule)
        # A replica wrote STOPPED and died before the host had been told (or the store was restored).
        assert world.team.id is not None
        async with world.db.transaction() as session:
            await CapsuleRepository(session, world.team.id).set_status(capsule.id, CapsuleStatus.STOPPED)
        await world.lifecycle.reconcile_host("h1")
        assert not process_alive(process)
        assert capsule.id not in {c.capsule_id for c in await world.client.list_capsules()}
        record = await world.record(capsule.id, "sleeper")
        assert record.status is ProcessStatus.EXITED and record.signal == "SIGKILL"

    async def test_a_running_capsule_the_host_lost_is_given_back(self, world: World) -> None:
        capsule = await world.place()
        process = await world.start(capsule)
        await world.client.destroy_capsule(capsule.id)  # as an agent that lost its data would
        await world.lifecycle.reconcile_host("h1")
        assert (await world.capsule(capsule.id)).status is CapsuleStatus.RUNNING
        assert capsule.id in {c.capsule_id for c in await world.client.list_capsules()}
        record = await world.record(capsule.id, "sleeper")
        assert record.status is ProcessStatus.EXITED and record.ended_at is not None
        assert not process_alive(process)

    async def test_a_capsule_the_host_cannot_hold_again_is_error(
        self, world: World, settings: Settings
    ) -> None:
        capsule = await world.place()
        await world.start(capsule)
        await world.client.destroy_capsule(capsule.id)
        # A file where the capsule's directory goes: the agent cannot make its place again.
        (settings.agent_dir / "capsules" / capsule.id).write_text("in the way")
        with pytest.raises(Internal):
            await world.client.create_capsule(capsule.id)
        await world.lifecycle.reconcile_host("h1")
        assert (await world.capsule(capsule.id)).status is CapsuleStatus.ERROR
        record = await world.record(capsule.id, "sleeper")
        # Nobody knows how it ended: the record says when, and no more.
        assert record.status is ProcessStatus.EXITED
        assert (record.exit_code, record.signal) == (None, None)
        assert record.ended_at is not None

    async def test_exits_missed_while_nobody_watched_are_recorded(self, world: World) -> None:
        capsule = await world.place()
        info = await world.client.start_process(
            capsule.id, ProcessSpec(cmd="sh", args=("-c", "exit 3"), tag="quick")
        )
        await world.records.record_start(
            capsule.team_id, dataclasses.replace(info, status=ProcessStatus.RUNNING)
        )
        async with asyncio.timeout(DEADLINE):
            while (await world.client.get_process(capsule.id, "quick")).status is ProcessStatus.RUNNING:
                await asyncio.sleep(0.02)
        await world.lifecycle.reconcile_host("h1")
        record = await world.record(capsule.id, "quick")
        assert (record.status, record.exit_code) == (ProcessStatus.EXITED, 3)

    async def test_a_stale_starting_capsule_is_settled(self, world: World) -> None:
        long_ago = utcnow() - timedelta(hours=1)
        hosted = await make_capsule(world.db, world.team, status=CapsuleStatus.STARTING, created_at=long_ago)
        await world.client.create_capsule(hosted.id)
        lost = await make_capsule(world.db, world.team, status=CapsuleStatus.STARTING, created_at=long_ago)
        fresh = await make_capsule(world.db, world.team, status=CapsuleStatus.STARTING)
        await world.lifecycle.reconcile_host("h1")
        assert (await world.capsule(hosted.id)).status is CapsuleStatus.RUNNING
        assert (await world.capsule(lost.id)).status is CapsuleStatus.ERROR
        assert (await world.capsule(fresh.id)).status is CapsuleStatus.STARTING  # still being created

    async def test_capsules_the_store_does_not_know_are_left_alone(self, world: World) -> None:
        await world.client.create_capsule("cap-foreign")
        await world.lifecycle.reconcile_host("h1")
        assert "cap-foreign" in {c.capsule_id for c in await world.client.list_capsules()}

    async def test_an_unreachable_host_changes_nothing(self, world: World) -> None:
        capsule = await world.place()
        await world.start(capsule)
        world.cut_off()
        await world.lifecycle.reconcile_host("h1")
        assert (await world.capsule(capsule.id)).status is CapsuleStatus.RUNNING
        assert (await world.record(capsule.id, "sleeper")).status is ProcessStatus.RUNNING


class TestExitRecorder:
    async def test_a_restarted_agent_is_reconciled_when_it_comes_back(
        self, world: World, settings: Settings
    ) -> None:
        capsule = await world.place()
        process = await world.start(capsule)
        hosts = HostService(world.db, {"h1": f"127.0.0.1:{world.agent.port}"})
        recorder = ExitRecorder(
            pool=world.pool, hosts=hosts, records=world.records, lifecycle=world.lifecycle
        )
        follower = asyncio.create_task(recorder.follow("h1"))
        try:
            await world.start(capsule, tag="short")
            await world.client.signal_process(
                capsule.id, "short", signal=signal.SIGTERM, scope=SignalScope.GROUP
            )
            async with asyncio.timeout(DEADLINE):
                while (await world.record(capsule.id, "short")).status is ProcessStatus.RUNNING:
                    await asyncio.sleep(0.02)
            assert (await world.record(capsule.id, "short")).signal == "SIGTERM"
            # The agent goes down with its processes and comes back on the same port and data.
            port = world.agent.port
            await world.agent.stop()
            assert not process_alive(process)
            again = await start_agent(f"127.0.0.1:{port}", settings)
            try:
                async with asyncio.timeout(DEADLINE):
                    while (await world.record(capsule.id, "sleeper")).status is ProcessStatus.RUNNING:
                        await asyncio.sleep(0.05)
                assert capsule.id in {c.capsule_id for c in await world.client.list_capsules()}
                assert (await world.capsule(capsule.id)).status is CapsuleStatus.RUNNING
            finally:
                await again.stop()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

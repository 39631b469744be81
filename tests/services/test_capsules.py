"""CapsuleService on the real store and the embedded agent: create, destroy, get and require,
require_running, list and in_use, each for a missing capsule, another team's, a wrong state, and valid."""

from __future__ import annotations

import asyncio
import math
import signal
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.domain import (
    CapsuleLimits,
    CapsuleRuntime,
    CapsuleStatus,
    ProcessSpec,
    ProcessStatus,
    RequestedLimits,
    utcnow,
)
from app.errors import ErrorCode, InvalidRequest, InvalidState, NotFound, RateLimited
from app.services.capsules import MAX_CAPSULE_TIMEOUT_SEC
from app.state import EMBEDDED_HOST_ID
from app.store.repositories import CapsuleRepository
from tests.services.conftest import MAX_CAPSULES, MISSING, Teams, refused_as_missing, until, words
from tests.system import process_alive

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOT_RUNNING = [CapsuleStatus.STARTING, CapsuleStatus.STOPPING, CapsuleStatus.STOPPED, CapsuleStatus.ERROR]


async def hosted(teams: Teams) -> set[str]:
    """The ids of the capsules the agent holds."""
    return {c.capsule_id for c in await teams.host.list_capsules()}


async def age(teams: Teams, capsule_id: str, *, by: timedelta) -> None:
    """Moves the capsule's last activity back, as if it had been idle for `by`."""
    async with teams.state.platform.db.transaction() as session:
        row = await CapsuleRepository(session, teams.ours.team.id).get(capsule_id)
        assert row is not None
        row.last_active_at = utcnow() - by
        session.add(row)


class TestCreate:
    async def test_valid(self, teams: Teams) -> None:
        capsule = await teams.ours.capsules.create(timeout_sec=120)
        assert capsule.status is CapsuleStatus.RUNNING
        assert (capsule.team_id, capsule.host_id, capsule.timeout_sec) == (
            teams.ours.team.id,
            EMBEDDED_HOST_ID,
            120,
        )
        assert capsule.id in await hosted(teams)
        assert await teams.stored(capsule.id) == capsule

    @pytest.mark.parametrize("timeout_sec", [0, -1, MAX_CAPSULE_TIMEOUT_SEC + 1])
    async def test_bad_timeout_is_invalid_request(self, teams: Teams, timeout_sec: int) -> None:
        with pytest.raises(InvalidRequest, match="timeoutSec must be between 1 and") as caught:
            await teams.ours.capsules.create(timeout_sec=timeout_sec)
        assert caught.value.code is ErrorCode.INVALID_REQUEST
        assert await teams.ours.capsules.list() == []

    async def test_network_and_limits_are_stored_and_given_to_the_host(self, teams: Teams) -> None:
        asked = RequestedLimits(max_processes=32, memory_mib=256, cpus=0.5)
        capsule = await teams.ours.capsules.create(timeout_sec=300, network=True, limits=asked)
        limits = CapsuleLimits(max_processes=32, memory_mib=256, cpus=0.5)
        assert (capsule.network, capsule.limits) == (True, limits)
        assert await teams.stored(capsule.id) == capsule
        on_host = await teams.host.get_capsule(capsule.id)
        assert (on_host.network, on_host.limits) == (True, limits)

    async def test_limits_left_out_are_the_servers_defaults(self, teams: Teams) -> None:
        defaults = teams.state.settings.capsule_limits
        capsule = await teams.ours.capsules.create(timeout_sec=300)
        assert (capsule.network, capsule.limits) == (False, defaults)
        partly = await teams.ours.capsules.create(timeout_sec=300, limits=RequestedLimits(memory_mib=64))
        assert partly.limits == CapsuleLimits(
            max_processes=defaults.max_processes, memory_mib=64, cpus=defaults.cpus
        )
        assert (await teams.host.get_capsule(partly.id)).limits == partly.limits

    @pytest.mark.parametrize(
        ("limits", "words"),
        [
            (RequestedLimits(max_processes=0), "limits.maxProcesses is 0: pass 1 to 65536 processes"),
            (RequestedLimits(max_processes=-5), "limits.maxProcesses is -5: pass 1 to 65536 processes"),
            (RequestedLimits(max_processes=65537), "limits.maxProcesses is 65537: pass 1 to 65536 processes"),
            (RequestedLimits(memory_mib=63), "limits.memoryMiB is 63: pass 64 to 1048576 MiB"),
            (RequestedLimits(memory_mib=2**20 + 1), "limits.memoryMiB is 1048577: pass 64 to 1048576 MiB"),
            (RequestedLimits(cpus=0.0), "limits.cpus is 0.0: pass 0.01 to 1024 cores"),
            (RequestedLimits(cpus=0.001), "limits.cpus is 0.001: pass 0.01 to 1024 cores"),
            (RequestedLimits(cpus=-1.0), "limits.cpus is -1.0: pass 0.01 to 1024 cores"),
            (RequestedLimits(cpus=1024.5), "limits.cpus is 1024.5: pass 0.01 to 1024 cores"),
            (RequestedLimits(cpus=math.nan), "limits.cpus is not a number: pass 0.01 to 1024 cores"),
            (RequestedLimits(cpus=math.inf), "limits.cpus is inf: pass 0.01 to 1024 cores"),
        ],
    )
    async def test_bad_limits_are_invalid_request_naming_the_field(
        self, teams: Teams, limits: RequestedLimits, words: str
    ) -> None:
        with pytest.raises(InvalidRequest) as caught:
            await teams.ours.capsules.create(timeout_sec=300, limits=limits)
        assert caught.value.code is ErrorCode.INVALID_REQUEST
        assert str(caught.value) == words
        assert await teams.ours.capsules.list() == []

    async def test_the_limits_at_their_bounds_are_taken(self, teams: Teams) -> None:
        low = await teams.ours.capsules.create(
            timeout_sec=300, limits=RequestedLimits(max_processes=1, memory_mib=64, cpus=0.01)
        )
        assert low.limits == CapsuleLimits(max_processes=1, memory_mib=64, cpus=0.01)
        await teams.ours.capsules.destroy(low.id)  # within the team's limit of capsules
        high = await teams.ours.capsules.create(
            timeout_sec=300, limits=RequestedLimits(max_processes=65536, memory_mib=2**20, cpus=1024)
        )
        assert high.limits == CapsuleLimits(max_processes=65536, memory_mib=2**20, cpus=1024)

    async def test_the_runtime_is_the_one_its_host_reports(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        assert capsule.runtime is (await teams.host.get_capsule(capsule.id)).runtime
        assert (await teams.stored(capsule.id)).runtime is capsule.runtime

    async def test_a_capsule_its_host_lost_comes_back_with_its_own_network_and_limits(
        self, teams: Teams
    ) -> None:
        asked = RequestedLimits(max_processes=48, memory_mib=128, cpus=0.25)
        capsule = await teams.ours.capsules.create(timeout_sec=300, network=True, limits=asked)
        await teams.host.destroy_capsule(capsule.id)  # as an agent that lost its data would
        await teams.state.platform.lifecycle.reconcile_host(EMBEDDED_HOST_ID)
        back = await teams.host.get_capsule(capsule.id)
        assert (back.network, back.limits) == (True, capsule.limits)
        assert await teams.stored(capsule.id) == capsule

    async def test_past_the_team_limit_is_rate_limited(self, teams: Teams) -> None:
        made = [await teams.capsule() for _ in range(MAX_CAPSULES)]
        with pytest.raises(RateLimited) as caught:
            await teams.capsule()
        assert caught.value.code is ErrorCode.RATE_LIMITED
        assert f"team {teams.ours.team.name} has {MAX_CAPSULES} capsules running" in str(caught.value)
        assert "destroy one" in str(caught.value)
        # The limit is the team's own: another team creates as it likes.
        await teams.capsule(teams.theirs)
        # Stopped capsules no longer count.
        await teams.ours.capsules.destroy(made[0].id)
        assert (await teams.capsule()).status is CapsuleStatus.RUNNING

    async def test_concurrent_creates_stay_within_the_limit(self, teams: Teams) -> None:
        attempts = MAX_CAPSULES + 4
        outcomes = await asyncio.gather(
            *(teams.ours.capsules.create(timeout_sec=300) for _ in range(attempts)), return_exceptions=True
        )
        limited = [o for o in outcomes if isinstance(o, RateLimited)]
        assert len(limited) == attempts - MAX_CAPSULES, outcomes
        active = [c for c in await teams.ours.capsules.list() if c.status is CapsuleStatus.RUNNING]
        assert len(active) == MAX_CAPSULES


class TestGet:
    async def test_not_existing_is_none(self, teams: Teams) -> None:
        assert await teams.ours.capsules.get(MISSING) is None

    async def test_other_teams_capsule_is_none(self, teams: Teams) -> None:
        theirs = await teams.capsule(teams.theirs)
        assert await teams.ours.capsules.get(theirs.id) is None

    async def test_valid(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        assert await teams.ours.capsules.get(capsule.id) == capsule


class TestRequire:
    async def test_not_existing_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound) as caught:
            await teams.ours.capsules.require(MISSING)
        assert caught.value.code is ErrorCode.NOT_FOUND
        assert str(caught.value) == f"no capsule {MISSING}"

    async def test_other_teams_capsule_is_not_found_in_the_same_words(self, teams: Teams) -> None:
        await refused_as_missing(teams, teams.ours.capsules.require)

    @pytest.mark.parametrize("status", NOT_RUNNING)
    async def test_any_state_is_returned(self, teams: Teams, status: CapsuleStatus) -> None:
        capsule = await teams.stored_capsule(status)
        assert (await teams.ours.capsules.require(capsule.id)).status is status


class TestRequireRunning:
    async def test_not_existing_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.capsules.require_running(MISSING)

    async def test_other_teams_capsule_is_not_found_in_the_same_words(self, teams: Teams) -> None:
        await refused_as_missing(teams, teams.ours.capsules.require_running)
        # Even one whose state its owner would be told: that says it exists.
        stopped = await teams.stored_capsule(CapsuleStatus.STOPPED, services=teams.theirs)
        with pytest.raises(NotFound, match=f"^no capsule {stopped.id}$"):
            await teams.ours.capsules.require_running(stopped.id)

    @pytest.mark.parametrize("status", NOT_RUNNING)
    async def test_not_running_is_invalid_state(self, teams: Teams, status: CapsuleStatus) -> None:
        capsule = await teams.stored_capsule(status)
        with pytest.raises(InvalidState) as caught:
            await teams.ours.capsules.require_running(capsule.id)
        assert caught.value.code is ErrorCode.INVALID_STATE
        assert str(caught.value) == f"capsule {capsule.id} is {status.value}, not RUNNING"

    async def test_a_destroyed_capsule_is_invalid_state(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        await teams.ours.capsules.destroy(capsule.id)
        with pytest.raises(InvalidState, match="is STOPPED, not RUNNING"):
            await teams.ours.capsules.require_running(capsule.id)

    async def test_valid_marks_it_active(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        await age(teams, capsule.id, by=timedelta(minutes=1))
        before = utcnow()
        assert (await teams.ours.capsules.require_running(capsule.id)).id == capsule.id
        touched = (await teams.stored(capsule.id)).last_active_at
        assert touched >= before
        # Within one busy stretch, no second write.
        await teams.ours.capsules.require_running(capsule.id)
        assert (await teams.stored(capsule.id)).last_active_at == touched

    async def test_calls_arriving_together_mark_it_active_with_one_write(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        await age(teams, capsule.id, by=timedelta(minutes=1))
        before = utcnow()
        updates: list[str] = []

        def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
            if statement.lstrip().upper().startswith("UPDATE CAPSULE"):
                updates.append(statement)

        engine = teams.state.platform.db.engine.sync_engine
        sa.event.listen(engine, "before_cursor_execute", seen)
        try:
            # All of them read the same old lastActiveAt; one of them writes the new one.
            found = await asyncio.gather(
                *(teams.ours.capsules.require_running(capsule.id) for _ in range(20))
            )
        finally:
            sa.event.remove(engine, "before_cursor_execute", seen)
        assert {c.id for c in found} == {capsule.id}
        assert len(updates) == 1, updates
        assert (await teams.stored(capsule.id)).last_active_at >= before


class TestInUse:
    async def test_keeps_the_capsule_active_while_it_lasts(self, teams: Teams) -> None:
        capsule = await teams.ours.capsules.create(timeout_sec=1)
        await age(teams, capsule.id, by=timedelta(minutes=1))
        since = utcnow()

        async def touched() -> bool:
            return (await teams.stored(capsule.id)).last_active_at >= since

        async with teams.ours.capsules.in_use(capsule):
            await until(touched, what="in_use to mark the capsule active")
            assert any(t.get_name() == f"in-use-{capsule.id}" for t in asyncio.all_tasks())
        # Its beat ends with the block.
        assert not any(t.get_name() == f"in-use-{capsule.id}" for t in asyncio.all_tasks())


class TestList:
    async def test_only_the_teams_own_newest_first(self, teams: Teams) -> None:
        older = await teams.capsule()
        await teams.capsule(teams.theirs)
        stopped = await teams.stored_capsule(CapsuleStatus.STOPPED)
        newer = await teams.capsule()
        listed = await teams.ours.capsules.list()
        assert [c.id for c in listed] == [newer.id, stopped.id, older.id]
        assert {c.team_id for c in listed} == {teams.ours.team.id}

    async def test_none_is_empty(self, teams: Teams) -> None:
        await teams.capsule(teams.theirs)
        assert await teams.ours.capsules.list() == []


class TestDestroy:
    async def test_not_existing_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.capsules.destroy(MISSING)

    async def test_other_teams_capsule_is_not_found_and_left_running(self, teams: Teams) -> None:
        theirs = await teams.capsule(teams.theirs)
        process = await teams.theirs.processes.start(theirs.id, ProcessSpec(cmd="sleep", args=("1000",)))
        with pytest.raises(NotFound) as other:
            await teams.ours.capsules.destroy(theirs.id)
        with pytest.raises(NotFound) as missing:
            await teams.ours.capsules.destroy(MISSING)
        assert words(other.value, theirs.id) == words(missing.value, MISSING)
        assert (await teams.stored(theirs.id, teams.theirs)).status is CapsuleStatus.RUNNING
        assert theirs.id in await hosted(teams)
        assert process_alive(process)

    async def test_valid_ends_its_processes_and_leaves_the_host(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        process = await teams.ours.processes.start(
            capsule.id, ProcessSpec(cmd="sleep", args=("1000",), tag="sleeper")
        )
        destroyed = await teams.ours.capsules.destroy(capsule.id)
        assert destroyed.status is CapsuleStatus.STOPPED
        assert await teams.stored(capsule.id) == destroyed
        assert not process_alive(process)
        assert capsule.id not in await hosted(teams)
        record = await teams.record(capsule.id, "sleeper")
        assert record is not None and record.status is ProcessStatus.EXITED
        assert record.signal == signal.SIGKILL.name and record.ended_at is not None

    async def test_destroying_again_changes_nothing(self, teams: Teams) -> None:
        destroyed = await teams.ours.capsules.destroy((await teams.capsule()).id)
        assert await teams.ours.capsules.destroy(destroyed.id) == destroyed

    @pytest.mark.parametrize("status", [CapsuleStatus.STARTING, CapsuleStatus.ERROR])
    async def test_a_capsule_the_host_does_not_hold_is_stopped(
        self, teams: Teams, status: CapsuleStatus
    ) -> None:
        capsule = await teams.stored_capsule(status, host_id=EMBEDDED_HOST_ID)
        assert (await teams.ours.capsules.destroy(capsule.id)).status is CapsuleStatus.STOPPED


class TestUsage:
    async def test_none_on_plain_measured_on_sandbox(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="sleep", args=("1000",)))
        usage = await teams.ours.capsules.usage(capsule)
        if capsule.runtime is CapsuleRuntime.PLAIN:
            assert usage is None
        else:
            assert usage is not None and usage.processes >= 1
            assert 0 <= usage.memory_bytes <= usage.memory_peak_bytes and usage.cpu_sec >= 0

    @pytest.mark.parametrize("status", NOT_RUNNING)
    async def test_a_capsule_not_running_has_none(self, teams: Teams, status: CapsuleStatus) -> None:
        capsule = await teams.stored_capsule(status, host_id=EMBEDDED_HOST_ID)
        assert await teams.ours.capsules.usage(capsule) is None

    async def test_an_unreachable_host_is_none_not_an_error(self, teams: Teams) -> None:
        capsule = await teams.stored_capsule(CapsuleStatus.RUNNING)  # on a host nobody answers for
        assert await teams.ours.capsules.usage(capsule) is None

    async def test_a_capsule_its_host_lost_has_none(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        await teams.host.destroy_capsule(capsule.id)
        assert await teams.ours.capsules.usage(capsule) is None

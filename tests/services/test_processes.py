"""ProcessService on the real store and the embedded agent: start, list, get, signal, stop, send and
close input, events; each for a missing capsule or process, another team's capsule, a capsule that is
not running, a process that has exited, bad input, and valid."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace

import pytest

from app.domain import (
    OutputChunk,
    ProcessEventKind,
    ProcessExit,
    ProcessInfo,
    ProcessSpec,
    ProcessStatus,
    SignalScope,
)
from app.errors import Conflict, ErrorCode, InvalidRequest, InvalidState, NotFound, RateLimited
from app.services.processes import MAX_GRACE_SEC
from tests.services.conftest import (
    MAX_INPUT_BYTES,
    MAX_PROCESSES,
    MISSING,
    Teams,
    collect,
    first,
    refused_as_missing,
    refused_when_not_running,
    until,
)
from tests.system import process_alive

pytestmark = pytest.mark.asyncio(loop_scope="module")

SLEEP = ProcessSpec(cmd="sleep", args=("1000",))
# Reads one line, then exits with the code it read: the test decides when it ends.
READ_EXIT = ProcessSpec(cmd="sh", args=("-c", 'read code; exit "$code"'), stdin=True)


async def exited(teams: Teams, capsule_id: str, process: ProcessInfo) -> ProcessInfo:
    """The process once the agent says it has exited."""

    async def done() -> ProcessInfo | None:
        info = await teams.ours.processes.get(capsule_id, process.tag)
        return info if info is not None and info.status is ProcessStatus.EXITED else None

    return await until(done, what=f"process {process.tag} to exit")


class TestStart:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.processes.start(MISSING, SLEEP)

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(teams, lambda capsule_id: teams.ours.processes.start(capsule_id, SLEEP))
        [theirs] = await teams.theirs.capsules.list()
        assert await teams.theirs.processes.list(theirs.id) == []

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(
            teams, lambda capsule_id: teams.ours.processes.start(capsule_id, SLEEP)
        )

    @pytest.mark.parametrize(
        ("spec", "words"),
        [
            (ProcessSpec(cmd=" "), "cmd is empty"),
            (ProcessSpec(cmd="sh\0"), "NUL"),
            (ProcessSpec(cmd="sleep", tag="123"), "all digits"),
            (ProcessSpec(cmd="sleep", tag="-web"), "malformed"),
            (ProcessSpec(cmd="sleep", timeout_sec=-1), "timeoutSec is negative"),
        ],
    )
    async def test_bad_input_is_invalid_request(self, teams: Teams, spec: ProcessSpec, words: str) -> None:
        capsule = await teams.capsule()
        with pytest.raises(InvalidRequest, match=words) as caught:
            await teams.ours.processes.start(capsule.id, spec)
        assert caught.value.code is ErrorCode.INVALID_REQUEST
        assert await teams.ours.processes.list(capsule.id) == []

    async def test_a_tag_in_use_is_conflict(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        web = await teams.ours.processes.start(
            capsule.id, ProcessSpec(cmd="sleep", args=("1000",), tag="web")
        )
        with pytest.raises(Conflict) as caught:
            await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="true", tag="web"))
        assert caught.value.code is ErrorCode.CONFLICT
        assert f"tag 'web' is already used by process {web.pid}" in str(caught.value)
        [listed] = await teams.ours.processes.list(capsule.id)
        assert (listed.pid, listed.status) == (web.pid, ProcessStatus.RUNNING)

    async def test_past_the_process_limit_is_rate_limited(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        running = [await teams.ours.processes.start(capsule.id, SLEEP) for _ in range(MAX_PROCESSES)]
        with pytest.raises(RateLimited) as caught:
            await teams.ours.processes.start(capsule.id, SLEEP)
        assert caught.value.code is ErrorCode.RATE_LIMITED
        assert f"capsule {capsule.id} runs {MAX_PROCESSES} processes" in str(caught.value)
        assert "stop one" in str(caught.value)
        # The limit is the capsule's: another capsule of the team starts as it likes.
        other = await teams.capsule()
        await teams.ours.processes.start(other.id, SLEEP)
        # A process that has ended no longer counts.
        await teams.ours.processes.stop(capsule.id, running[0].tag, grace_sec=0)
        assert (await teams.ours.processes.start(capsule.id, SLEEP)).status is ProcessStatus.RUNNING

    async def test_concurrent_starts_stay_within_the_limit(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        attempts = MAX_PROCESSES + 3
        outcomes = await asyncio.gather(
            *(teams.ours.processes.start(capsule.id, SLEEP) for _ in range(attempts)), return_exceptions=True
        )
        assert len([o for o in outcomes if isinstance(o, RateLimited)]) == attempts - MAX_PROCESSES, outcomes
        assert len(await teams.ours.processes.list(capsule.id, ProcessStatus.RUNNING)) == MAX_PROCESSES

    async def test_valid_is_recorded_and_announced(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        async with teams.events(capsule.id) as events:
            info = await teams.ours.processes.start(
                capsule.id, ProcessSpec(cmd="sleep", args=("1000",), tag="sleeper")
            )
            started = await events.event(ProcessEventKind.STARTED, "sleeper")
        assert (info.tag, info.cmd, info.args, info.status) == (
            "sleeper",
            "sleep",
            ("1000",),
            ProcessStatus.RUNNING,
        )
        assert process_alive(info)
        assert started.process.pid == info.pid
        record = await teams.record(capsule.id, "sleeper")
        assert record is not None
        assert (record.team_id, record.pid, record.cmd, record.args, record.status) == (
            teams.ours.team.id,
            info.pid,
            "sleep",
            ["1000"],
            ProcessStatus.RUNNING,
        )

    async def test_without_a_tag_one_is_made(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        assert info.tag.startswith("proc-") and len(info.tag) == len("proc-") + 8


class TestList:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.processes.list(MISSING)

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(teams, teams.ours.processes.list)

    async def test_valid_running_first_then_newest(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        done = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="sh", args=("-c", "exit 4")))
        await exited(teams, capsule.id, done)
        older = await teams.ours.processes.start(capsule.id, SLEEP)
        newer = await teams.ours.processes.start(capsule.id, SLEEP)
        listed = await teams.ours.processes.list(capsule.id)
        assert [p.tag for p in listed] == [newer.tag, older.tag, done.tag]
        assert listed[2].exit_code == 4
        running = await teams.ours.processes.list(capsule.id, ProcessStatus.RUNNING)
        assert [p.tag for p in running] == [newer.tag, older.tag]
        assert [p.tag for p in await teams.ours.processes.list(capsule.id, ProcessStatus.EXITED)] == [
            done.tag
        ]

    async def test_a_destroyed_capsule_lists_its_records(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        await teams.ours.capsules.destroy(capsule.id)
        [listed] = await teams.ours.processes.list(capsule.id)
        assert (listed.tag, listed.status, listed.signal) == (info.tag, ProcessStatus.EXITED, signal.SIGKILL)


class TestGet:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.processes.get(MISSING, "web")

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(teams, lambda capsule_id: teams.ours.processes.get(capsule_id, "web"))

    async def test_not_existing_process_is_none(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        assert await teams.ours.processes.get(capsule.id, "web") is None
        assert await teams.ours.processes.get(capsule.id, "4000000") is None

    async def test_bad_selector_is_invalid_request(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        with pytest.raises(InvalidRequest, match="neither a PID"):
            await teams.ours.processes.get(capsule.id, "-web")

    async def test_valid_by_tag_and_by_pid(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        # Its usage is measured anew at each ask; the rest is the process as it started.
        by_tag = await teams.ours.processes.get(capsule.id, info.tag)
        by_pid = await teams.ours.processes.get(capsule.id, str(info.pid))
        assert by_tag is not None and replace(by_tag, usage=info.usage) == info
        assert by_pid is not None and replace(by_pid, usage=info.usage) == info

    async def test_a_destroyed_capsule_answers_from_its_records(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        await teams.ours.capsules.destroy(capsule.id)
        found = await teams.ours.processes.get(capsule.id, str(info.pid))
        assert found is not None
        assert (found.tag, found.status, found.signal) == (info.tag, ProcessStatus.EXITED, signal.SIGKILL)


class TestSignal:
    async def signal(
        self, teams: Teams, capsule_id: str, selector: str, signum: signal.Signals
    ) -> ProcessInfo:
        return await teams.ours.processes.signal(capsule_id, selector, signum=signum, scope=SignalScope.GROUP)

    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await self.signal(teams, MISSING, "web", signal.SIGTERM)

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(
            teams, lambda capsule_id: self.signal(teams, capsule_id, "web", signal.SIGTERM)
        )
        [theirs] = await teams.theirs.capsules.list()
        assert await teams.theirs.processes.list(theirs.id) == []

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(
            teams, lambda capsule_id: self.signal(teams, capsule_id, "web", signal.SIGTERM)
        )

    async def test_not_existing_process_is_not_found(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        with pytest.raises(NotFound, match="no process web"):
            await self.signal(teams, capsule.id, "web", signal.SIGTERM)

    async def test_a_signal_outside_the_contract_is_invalid_request(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        with pytest.raises(InvalidRequest, match="SIGSEGV cannot be sent"):
            await self.signal(teams, capsule.id, info.tag, signal.SIGSEGV)
        assert process_alive(info)

    async def test_an_exited_process_is_invalid_state(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        done = await exited(
            teams, capsule.id, await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="true"))
        )
        with pytest.raises(InvalidState, match="has already exited"):
            await self.signal(teams, capsule.id, done.tag, signal.SIGTERM)

    async def test_valid_the_record_says_which_signal(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        assert (await self.signal(teams, capsule.id, str(info.pid), signal.SIGTERM)).pid == info.pid
        record = await teams.exited_record(capsule.id, info.tag)
        assert (record.signal, record.exit_code) == ("SIGTERM", None)
        assert not process_alive(info)


class TestStop:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.processes.stop(MISSING, "web", grace_sec=0)

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(
            teams, lambda capsule_id: teams.ours.processes.stop(capsule_id, "web", grace_sec=0)
        )

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(
            teams, lambda capsule_id: teams.ours.processes.stop(capsule_id, "web", grace_sec=0)
        )

    @pytest.mark.parametrize("grace_sec", [-1, MAX_GRACE_SEC + 1])
    async def test_bad_grace_is_invalid_request(self, teams: Teams, grace_sec: int) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        with pytest.raises(InvalidRequest, match=f"graceSec must be between 0 and {MAX_GRACE_SEC}"):
            await teams.ours.processes.stop(capsule.id, info.tag, grace_sec=grace_sec)
        assert process_alive(info)

    async def test_valid_is_recorded_and_announced_once(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        async with teams.events(capsule.id) as events:
            info = await teams.ours.processes.start(capsule.id, SLEEP)
            stopped = await teams.ours.processes.stop(capsule.id, info.tag, grace_sec=5)
            # Written before stop answers; the exit recorder sees the same exit, and one of them writes it.
            record = await teams.record(capsule.id, info.tag)
            await events.event(ProcessEventKind.EXITED, info.tag)
            seen = await events.settled()
        assert (stopped.status, stopped.signal) == (ProcessStatus.EXITED, signal.SIGTERM)
        assert not process_alive(info)
        assert record is not None and (record.status, record.signal) == (ProcessStatus.EXITED, "SIGTERM")
        assert [(e.kind, e.process.tag) for e in seen] == [
            (ProcessEventKind.STARTED, info.tag),
            (ProcessEventKind.EXITED, info.tag),
        ]

    async def test_an_exited_process_answers_how_it_ended(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        started = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="sh", args=("-c", "exit 5")))
        done = await exited(teams, capsule.id, started)
        assert await teams.ours.processes.stop(capsule.id, done.tag, grace_sec=0) == done


class TestSendInput:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.processes.send_input(MISSING, "web", b"x")

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(
            teams, lambda capsule_id: teams.ours.processes.send_input(capsule_id, "web", b"x")
        )

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(
            teams, lambda capsule_id: teams.ours.processes.send_input(capsule_id, "web", b"x")
        )

    async def test_oversized_input_is_invalid_request(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, READ_EXIT)
        data = b"x" * (MAX_INPUT_BYTES + 1)
        with pytest.raises(InvalidRequest) as caught:
            await teams.ours.processes.send_input(capsule.id, info.tag, data)
        assert str(caught.value) == f"data has {len(data)} bytes; at most {MAX_INPUT_BYTES} are allowed"

    async def test_a_process_without_stdin_is_invalid_state(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, SLEEP)
        with pytest.raises(InvalidState, match="started without stdin"):
            await teams.ours.processes.send_input(capsule.id, info.tag, b"x")

    async def test_an_exited_process_is_invalid_state(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, READ_EXIT)
        await teams.ours.processes.send_input(capsule.id, info.tag, b"0\n")
        await exited(teams, capsule.id, info)
        with pytest.raises(InvalidState, match="has already exited"):
            await teams.ours.processes.send_input(capsule.id, info.tag, b"more\n")

    async def test_valid_reaches_the_process(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="cat", stdin=True))
        await teams.ours.processes.send_input(capsule.id, info.tag, b"hello\n")
        chunk = await first(teams.ours.output.follow(capsule.id, info.tag, 0))
        assert isinstance(chunk, OutputChunk) and chunk.data == b"hello\n"


class TestCloseInput:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await teams.ours.processes.close_input(MISSING, "web")

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(
            teams, lambda capsule_id: teams.ours.processes.close_input(capsule_id, "web")
        )

    async def test_capsule_not_running_is_invalid_state(self, teams: Teams) -> None:
        await refused_when_not_running(
            teams, lambda capsule_id: teams.ours.processes.close_input(capsule_id, "web")
        )

    async def test_closed_already_is_invalid_state(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(
            capsule.id, ProcessSpec(cmd="sleep", args=("1000",), stdin=True)
        )
        await teams.ours.processes.close_input(capsule.id, info.tag)
        with pytest.raises(InvalidState, match="already closed"):
            await teams.ours.processes.close_input(capsule.id, info.tag)

    async def test_valid_ends_a_reader(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        info = await teams.ours.processes.start(capsule.id, ProcessSpec(cmd="cat", stdin=True))
        await teams.ours.processes.close_input(capsule.id, info.tag)
        events = await collect(teams.ours.output.follow(capsule.id, info.tag, 0))
        assert isinstance(events[-1], ProcessExit) and events[-1].exit_code == 0
        assert (await teams.exited_record(capsule.id, info.tag)).exit_code == 0


class TestEvents:
    async def test_not_existing_capsule_is_not_found(self, teams: Teams) -> None:
        with pytest.raises(NotFound, match=f"^no capsule {MISSING}$"):
            await first(teams.ours.processes.events(MISSING))

    async def test_other_teams_capsule_is_not_found(self, teams: Teams) -> None:
        await refused_as_missing(teams, lambda capsule_id: first(teams.ours.processes.events(capsule_id)))

    async def test_valid_started_then_exited(self, teams: Teams) -> None:
        capsule = await teams.capsule()
        async with teams.events(capsule.id) as events:
            info = await teams.ours.processes.start(capsule.id, READ_EXIT)
            await events.event(ProcessEventKind.STARTED, info.tag)
            await teams.ours.processes.send_input(capsule.id, info.tag, b"3\n")
            ended = await events.event(ProcessEventKind.EXITED, info.tag)
            seen = await events.settled()
        assert [(e.kind, e.process.tag) for e in seen] == [
            (ProcessEventKind.STARTED, info.tag),
            (ProcessEventKind.EXITED, info.tag),
        ]
        assert (ended.process.status, ended.process.exit_code) == (ProcessStatus.EXITED, 3)
        assert ended.process.ended_at is not None

    async def test_a_capsule_hears_only_its_own(self, teams: Teams) -> None:
        capsule, other = await teams.capsule(), await teams.capsule()
        async with teams.events(capsule.id) as events:
            await teams.ours.processes.start(other.id, SLEEP)
            mine = await teams.ours.processes.start(capsule.id, SLEEP)
            await events.event(ProcessEventKind.STARTED, mine.tag)
            seen = await events.settled()
        assert [(e.kind, e.process.tag) for e in seen] == [(ProcessEventKind.STARTED, mine.tag)]

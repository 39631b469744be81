"""Background processes: start, list, get, signals, stop, lifetimes, stdin, watching."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from typing import Any

import grpc
import pytest

from app import domain, wire
from app.pb import agent_pb2 as pb
from tests.agent.conftest import MakeStub
from tests.agent.helpers import (
    echoed_pid,
    eventually,
    grpc_error,
    joined,
    read_output,
    ref,
    start_sh,
    wait_exited,
    wait_output,
)
from tests.system import capsule_alive, is_alive


class TestStartListGet:
    async def test_start_then_get_by_pid_and_by_tag(self, stub: Any, capsule: str) -> None:
        started = await start_sh(stub, capsule, "sleep 1000", tag="sleeper")
        assert started.status is domain.ProcessStatus.RUNNING
        assert started.tag == "sleeper"
        assert (started.cmd, started.args) == ("sh", ("-c", "sleep 1000"))
        by_pid = wire.process_info(await stub.GetProcess(ref(capsule, started.pid)))
        by_tag = wire.process_info(await stub.GetProcess(ref(capsule, "sleeper")))
        # Usage is measured anew at each ask; the rest is the process as it started.
        assert replace(by_pid, usage=None) == replace(by_tag, usage=None) == replace(started, usage=None)

    async def test_a_generated_tag(self, stub: Any, capsule: str) -> None:
        started = await start_sh(stub, capsule, "true")
        assert domain.ID_RE.fullmatch(started.tag)
        assert started.tag.startswith("proc-")

    async def test_list_running_first_then_exited(self, stub: Any, capsule: str) -> None:
        done = await start_sh(stub, capsule, "exit 3", tag="done")
        await wait_exited(stub, capsule, "done")
        running = await start_sh(stub, capsule, "sleep 1000", tag="running")
        listed = [
            wire.process_info(p)
            for p in (await stub.ListProcesses(pb.CapsuleRef(capsule_id=capsule))).processes
        ]
        assert [p.tag for p in listed] == ["running", "done"]
        assert listed[0].pid == running.pid and listed[0].ended_at is None
        exited = listed[1]
        assert exited.pid == done.pid
        assert (exited.status, exited.exit_code, exited.signal) == (domain.ProcessStatus.EXITED, 3, None)
        assert exited.ended_at is not None and exited.ended_at >= exited.started_at

    async def test_a_clean_environment_plus_the_callers(
        self, stub: Any, capsule: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CAPSULE_DATABASE_URL", "postgresql://secret@db/x")
        envs = [pb.EnvVar(name="GREETING", value="hi there")]
        info = await start_sh(stub, capsule, "env", envs=envs)
        lines = joined(await read_output(stub, capsule, info.pid)).decode().splitlines()
        workspace = (await stub.GetCapsule(pb.CapsuleRef(capsule_id=capsule))).workspace
        shell_own = ("PWD=", "OLDPWD=", "SHLVL=", "_=")  # what sh itself exports
        assert {line for line in lines if not line.startswith(shell_own)} == {
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f"HOME={workspace}",
            "LANG=C.UTF-8",
            "GREETING=hi there",
        }

    async def test_cwd_relative_to_the_workspace(self, stub: Any, capsule: str) -> None:
        workspace = (await stub.GetCapsule(pb.CapsuleRef(capsule_id=capsule))).workspace
        await stub.Exec(pb.ExecRequest(capsule_id=capsule, cmd="mkdir", args=["-p", "sub/dir"]))
        info = await start_sh(stub, capsule, "pwd", cwd="sub/dir")
        assert info.cwd == f"{workspace}/sub/dir"
        assert joined(await read_output(stub, capsule, info.pid)) == f"{workspace}/sub/dir\n".encode()


class TestSignals:
    async def test_group_kill_leaves_no_process_behind(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000 & echo $!; sleep 1000")
        background = await echoed_pid(stub, capsule, info.pid)
        assert capsule_alive(capsule, background)
        request = pb.SignalRequest(
            process=ref(capsule, info.pid), signal=signal.SIGKILL, scope=pb.SCOPE_GROUP
        )
        await stub.SignalProcess(request)
        exited = await wait_exited(stub, capsule, info.pid)
        assert (exited.exit_code, exited.signal) == (None, signal.SIGKILL)
        await eventually(lambda: not capsule_alive(capsule, background), what="the background sleep's death")

    async def test_leader_exit_kills_what_is_left_of_its_group(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000 & echo $!")
        background = await echoed_pid(stub, capsule, info.pid)
        # The orphan holds the pipes: the exit is only recorded promptly because it is killed.
        exited = await wait_exited(stub, capsule, info.pid, within=1.5)
        assert exited.exit_code == 0
        # Killed before the exit is reported; gone from /proc a moment later (its pipes close first).
        await eventually(lambda: not capsule_alive(capsule, background), what="the orphan's death")

    async def test_signal_to_the_process_alone(self, stub: Any, capsule: str) -> None:
        info = await start_sh(
            stub, capsule, "trap 'echo got-usr1; exit 4' USR1; echo ready; while :; do sleep 0.05; done"
        )
        await wait_output(stub, capsule, info.pid, b"ready")
        request = pb.SignalRequest(
            process=ref(capsule, info.tag), signal=signal.SIGUSR1, scope=pb.SCOPE_PROCESS
        )
        answer = wire.process_info(await stub.SignalProcess(request))
        assert answer.pid == info.pid
        exited = await wait_exited(stub, capsule, info.pid)
        assert exited.exit_code == 4
        assert b"got-usr1" in joined(await read_output(stub, capsule, info.pid))

    async def test_a_signal_that_cannot_be_sent(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000")
        for number in (signal.SIGSEGV, 0, 99):
            request = pb.SignalRequest(process=ref(capsule, info.pid), signal=number)
            error = await grpc_error(stub.SignalProcess(request))
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "SIGTERM" in error.details()

    async def test_a_signal_to_an_exited_process(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "true")
        await wait_exited(stub, capsule, info.pid)
        error = await grpc_error(
            stub.SignalProcess(pb.SignalRequest(process=ref(capsule, info.pid), signal=15))
        )
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION


class TestStop:
    async def test_a_trapped_sigterm_exits_gracefully(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done")
        await wait_output(stub, capsule, info.pid, b"ready")
        stopped = wire.process_info(
            await stub.StopProcess(pb.StopRequest(process=ref(capsule, info.pid), grace_sec=5))
        )
        assert (stopped.status, stopped.exit_code, stopped.signal) == (domain.ProcessStatus.EXITED, 7, None)

    async def test_an_ignored_sigterm_is_escalated_to_sigkill(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
        await wait_output(stub, capsule, info.pid, b"ready")
        request = pb.StopRequest(process=ref(capsule, info.pid), grace_sec=0.3)
        stopped = wire.process_info(await stub.StopProcess(request))
        assert (stopped.status, stopped.exit_code, stopped.signal) == (
            domain.ProcessStatus.EXITED,
            None,
            signal.SIGKILL,
        )

    async def test_stopping_an_exited_process_returns_it(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "exit 2")
        await wait_exited(stub, capsule, info.pid)
        stopped = wire.process_info(
            await stub.StopProcess(pb.StopRequest(process=ref(capsule, info.pid), grace_sec=1))
        )
        assert (stopped.status, stopped.exit_code) == (domain.ProcessStatus.EXITED, 2)


class TestLifetime:
    async def test_the_group_is_killed_when_the_lifetime_runs_out(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000 & echo $!; sleep 1000", timeout_sec=0.5)
        background = await echoed_pid(stub, capsule, info.pid)
        exited = await wait_exited(stub, capsule, info.pid)
        assert (exited.timed_out, exited.signal, exited.exit_code) == (True, signal.SIGKILL, None)
        # Killed before the exit is reported; gone from /proc a moment later (its pipes close first).
        await eventually(lambda: not capsule_alive(capsule, background), what="the group's death")
        exit_event = (await read_output(stub, capsule, info.pid))[-1]
        assert isinstance(exit_event, domain.ProcessExit) and exit_event.timed_out

    async def test_a_process_that_ends_in_time_is_not_timed_out(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "exit 0", timeout_sec=30)
        exited = await wait_exited(stub, capsule, info.pid)
        assert (exited.timed_out, exited.exit_code) == (False, 0)


class TestStdin:
    async def test_a_round_trip_through_cat(self, stub: Any, capsule: str) -> None:
        info = wire.process_info(
            await stub.StartProcess(pb.StartRequest(capsule_id=capsule, cmd="cat", stdin=True))
        )
        assert info.stdin
        await stub.SendInput(pb.InputRequest(process=ref(capsule, info.pid), data=b"hello\n"))
        await wait_output(stub, capsule, info.pid, b"hello\n")
        await stub.SendInput(pb.InputRequest(process=ref(capsule, info.pid), data=b"\xff\x00bye"))
        await stub.CloseInput(ref(capsule, info.pid))
        exited = await wait_exited(stub, capsule, info.pid)
        assert exited.exit_code == 0
        assert joined(await read_output(stub, capsule, info.pid)) == b"hello\n\xff\x00bye"

    async def test_a_process_without_stdin_reads_eof(self, stub: Any, capsule: str) -> None:
        info = wire.process_info(await stub.StartProcess(pb.StartRequest(capsule_id=capsule, cmd="cat")))
        exited = await wait_exited(stub, capsule, info.pid)
        assert exited.exit_code == 0
        assert joined(await read_output(stub, capsule, info.pid)) == b""

    async def test_input_to_a_process_without_stdin(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000")
        error = await grpc_error(stub.SendInput(pb.InputRequest(process=ref(capsule, info.pid), data=b"x")))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "without stdin" in error.details()
        error = await grpc_error(stub.CloseInput(ref(capsule, info.pid)))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION

    async def test_input_to_an_exited_process(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "exit 0", stdin=True)
        await wait_exited(stub, capsule, info.pid)
        error = await grpc_error(stub.SendInput(pb.InputRequest(process=ref(capsule, info.pid), data=b"x")))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "exited" in error.details()

    async def test_input_after_close(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000", stdin=True)
        await stub.CloseInput(ref(capsule, info.pid))
        error = await grpc_error(stub.SendInput(pb.InputRequest(process=ref(capsule, info.pid), data=b"x")))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "closed" in error.details()

    async def test_input_nobody_reads_does_not_hang(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "sleep 1000", stdin=True)
        request = pb.InputRequest(process=ref(capsule, info.pid), data=b"x" * (4 * 1024 * 1024))
        async with asyncio.timeout(5):  # the agent gives up after input_timeout_sec (0.5 s)
            error = await grpc_error(stub.SendInput(request))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "did not read its stdin" in error.details()


class TestWatch:
    async def test_started_and_exited_events_of_a_capsule(self, stub: Any, capsule: str) -> None:
        watch = stub.WatchProcesses(pb.CapsuleRef(capsule_id=capsule))
        await watch.initial_metadata()  # subscribed from here on
        await stub.Exec(pb.ExecRequest(capsule_id=capsule, cmd="true"))  # exec runs send no events
        info = await start_sh(stub, capsule, "exit 5")
        events = []
        async with asyncio.timeout(10):
            async for message in watch:
                events.append(wire.process_event(message))
                if len(events) == 2:
                    break
        watch.cancel()
        assert [e.kind for e in events] == [domain.ProcessEventKind.STARTED, domain.ProcessEventKind.EXITED]
        assert events[0].process == info
        assert (events[1].process.pid, events[1].process.exit_code) == (info.pid, 5)

    async def test_an_empty_capsule_id_watches_every_capsule(self, stub: Any, capsule: str) -> None:
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c2"))
        watch = stub.WatchProcesses(pb.CapsuleRef())
        await watch.initial_metadata()
        await start_sh(stub, capsule, "true")
        await start_sh(stub, "c2", "true")
        seen = set()
        async with asyncio.timeout(10):
            async for message in watch:
                event = wire.process_event(message)
                seen.add((event.process.capsule_id, event.kind))
                if len(seen) == 4:
                    break
        watch.cancel()
        assert {capsule_id for capsule_id, _ in seen} == {capsule, "c2"}

    async def test_watching_an_unknown_capsule(self, stub: Any) -> None:
        error = await grpc_error(stub.WatchProcesses(pb.CapsuleRef(capsule_id="nope")).read())
        assert error.code() is grpc.StatusCode.NOT_FOUND


class TestRetention:
    async def test_an_exited_process_is_dropped_after_retention(self, make_stub: Any) -> None:
        stub = await make_stub(retention_sec=0.3)
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
        info = await start_sh(stub, "c1", "echo bye", tag="brief")
        await wait_exited(stub, "c1", "brief")

        async def dropped() -> bool:
            try:
                await stub.GetProcess(ref("c1", "brief"))
            except grpc.aio.AioRpcError as error:
                return error.code() is grpc.StatusCode.NOT_FOUND
            return False

        await eventually(dropped, what="the drop of the exited process")
        error = await grpc_error(stub.GetProcess(ref("c1", info.pid)))
        assert error.code() is grpc.StatusCode.NOT_FOUND
        # Its tag is free again.
        await start_sh(stub, "c1", "true", tag="brief")


class TestEscapedProcess:
    async def test_an_escaped_pipe_holder_delays_the_exit_only_briefly(self, make_stub: MakeStub) -> None:
        # The plain runtime's own concern: in a sandbox, its cgroup holds what escapes the group.
        stub = await make_stub(runtime="plain")
        capsule = "c1"
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule))
        # setsid leaves the group, so the leader's exit cannot kill it, and it keeps stdout open.
        # The leader waits until the escape is done (the pid file is written after setsid).
        script = (
            "setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' & "
            "while [ ! -s escaped.pid ]; do sleep 0.01; done; cat escaped.pid"
        )
        started = time.monotonic()
        info = await start_sh(stub, capsule, script)
        escaped = await echoed_pid(stub, capsule, info.pid)
        try:
            exited = await wait_exited(stub, capsule, info.pid)
            assert exited.exit_code == 0
            assert 1.0 < time.monotonic() - started < 6.0  # the agent stops waiting on the pipes
            assert is_alive(escaped)  # the plain runtime cannot reach it
            assert joined(await read_output(stub, capsule, info.pid)) == f"{escaped}\n".encode()
        finally:
            os.kill(escaped, signal.SIGKILL)

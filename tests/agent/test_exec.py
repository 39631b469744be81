"""Exec: run to completion, timeouts that kill the group, truncation, stdin."""

from __future__ import annotations

import signal
from typing import Any

from app.pb import agent_pb2 as pb
from tests.agent.helpers import eventually, exec_sh, start_sh
from tests.system import capsule_alive


class TestExec:
    async def test_output_and_exit_code(self, stub: Any, capsule: str) -> None:
        result = await exec_sh(stub, capsule, "echo out; echo err >&2; exit 3")
        assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
        assert (result.signal, result.timed_out, result.truncated) == (None, False, False)
        assert 0 <= result.duration_ms < 5000

    async def test_a_normal_exit_has_no_signal(self, stub: Any, capsule: str) -> None:
        result = await stub.Exec(pb.ExecRequest(capsule_id=capsule, cmd="true", timeout_sec=5))
        assert (result.exit_code, result.signal, result.timed_out) == (0, 0, False)

    async def test_a_signal_ends_it(self, stub: Any, capsule: str) -> None:
        result = await exec_sh(stub, capsule, "kill -9 $$")
        assert (result.exit_code, result.signal, result.timed_out) == (-signal.SIGKILL, signal.SIGKILL, False)

    async def test_the_signal_that_ended_it_is_named(self, stub: Any, capsule: str) -> None:
        result = await exec_sh(stub, capsule, "kill -TERM $$")
        assert (result.exit_code, result.signal, result.timed_out) == (-signal.SIGTERM, signal.SIGTERM, False)

    async def test_timeout_kills_the_group_and_returns_partial_output(self, stub: Any, capsule: str) -> None:
        result = await exec_sh(
            stub, capsule, "sleep 1000 & echo $!; echo partial; sleep 1000", timeout_sec=0.5
        )
        assert result.timed_out
        assert (result.exit_code, result.signal) == (-signal.SIGKILL, signal.SIGKILL)
        background, partial = result.stdout.decode().splitlines()
        assert partial == "partial"
        assert 400 <= result.duration_ms < 5000
        gone = "the background sleep's death"
        await eventually(lambda: not capsule_alive(capsule, int(background)), what=gone)

    async def test_a_leftover_background_process_does_not_hold_it(self, stub: Any, capsule: str) -> None:
        result = await exec_sh(stub, capsule, "sleep 1000 & echo $!")
        assert (result.exit_code, result.timed_out) == (0, False)
        assert result.duration_ms < 1500
        gone = "the background sleep's death"
        await eventually(lambda: not capsule_alive(capsule, int(result.stdout)), what=gone)

    async def test_output_past_the_cap_is_dropped(self, make_stub: Any) -> None:
        stub = await make_stub(exec_output_cap_bytes=1000)
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
        result = await exec_sh(stub, "c1", "head -c 300000 /dev/zero; echo tail >&2; exit 4")
        assert result.stdout == b"\0" * 1000
        assert result.stderr == b"tail\n"
        assert (result.truncated, result.exit_code) == (True, 4)

    async def test_stdin_bytes(self, stub: Any, capsule: str) -> None:
        data = b"line one\n\xff\x00binary\n" * 10000
        result = await stub.Exec(pb.ExecRequest(capsule_id=capsule, cmd="cat", stdin=data))
        assert result.stdout == data
        assert result.exit_code == 0

    async def test_no_stdin_reads_eof(self, stub: Any, capsule: str) -> None:
        result = await stub.Exec(pb.ExecRequest(capsule_id=capsule, cmd="cat", timeout_sec=5))
        assert (result.stdout, result.exit_code, result.timed_out) == (b"", 0, False)

    async def test_the_default_timeout(self, make_stub: Any) -> None:
        stub = await make_stub(exec_default_timeout_sec=0.3)
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
        result = await exec_sh(stub, "c1", "sleep 1000")
        assert result.timed_out

    async def test_env_and_cwd(self, stub: Any, capsule: str) -> None:
        await exec_sh(stub, capsule, "mkdir -p work")
        result = await exec_sh(
            stub, capsule, 'echo "$NAME"; pwd', envs=[pb.EnvVar(name="NAME", value="v 1")], cwd="work"
        )
        workspace = (await stub.GetCapsule(pb.CapsuleRef(capsule_id=capsule))).workspace
        assert result.stdout == f"v 1\n{workspace}/work\n".encode()

    async def test_exec_runs_are_not_listed(self, stub: Any, capsule: str) -> None:
        await exec_sh(stub, capsule, "true")
        await start_sh(stub, capsule, "true", tag="listed")
        listed = (await stub.ListProcesses(pb.CapsuleRef(capsule_id=capsule))).processes
        assert [p.tag for p in listed] == ["listed"]

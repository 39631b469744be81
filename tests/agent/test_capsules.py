"""Capsules: create, get, list, destroy; the agent's lifecycle and health service."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.agent.server import run_agent, start_agent
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.conftest import agent_settings
from tests.agent.helpers import echoed_pid, eventually, grpc_error, ref, start_sh, wait_exited
from tests.system import TEST_RUNTIME, capsule_alive, free_port, process_alive, sandboxed


class TestCapsules:
    async def test_create_get_list(self, stub: Any, tmp_path: Path) -> None:
        created = await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="alpha"))
        assert created.capsule_id == "alpha"
        on_host = (tmp_path / "agent/capsules/alpha/workspace").resolve()
        assert Path(created.workspace) == (Path("/workspace") if sandboxed() else on_host)
        assert await asyncio.to_thread(on_host.is_dir)
        again = await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="alpha"))  # idempotent
        again.ClearField("usage")
        created.ClearField("usage")
        assert again == created
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="beta"))
        await start_sh(stub, "beta", "sleep 1000")
        assert (await stub.GetCapsule(pb.CapsuleRef(capsule_id="beta"))).running_processes == 1
        listed = (await stub.ListCapsules(pb.Empty())).capsules
        assert [(c.capsule_id, c.running_processes) for c in listed] == [("alpha", 0), ("beta", 1)]

    async def test_the_running_count_follows_starts_and_exits(self, stub: Any, capsule: str) -> None:
        async def running() -> int:
            return int((await stub.GetCapsule(pb.CapsuleRef(capsule_id=capsule))).running_processes)

        exited = [await start_sh(stub, capsule, "exit 0") for _ in range(3)]
        for info in exited:
            await wait_exited(stub, capsule, info.pid)
        assert await running() == 0  # exited ones are retained, not counted
        first = await start_sh(stub, capsule, "read line", stdin=True)
        await start_sh(stub, capsule, "sleep 1000", max_running=2)
        assert await running() == 2
        error = await grpc_error(
            stub.StartProcess(pb.StartRequest(capsule_id=capsule, cmd="true", max_running=2))
        )
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "runs 2 processes" in str(
            error.details()
        )
        await stub.CloseInput(ref(capsule, first.pid))
        await wait_exited(stub, capsule, first.pid)
        # The moment its exit is told, a process no longer counts against the limit.
        await start_sh(stub, capsule, "sleep 1000", max_running=2)
        assert await running() == 2

    async def test_destroy_kills_processes_and_removes_the_workspace(
        self, stub: Any, capsule: str, tmp_path: Path
    ) -> None:
        info = await start_sh(stub, capsule, "sleep 1000 & echo $!; sleep 1000")
        background = await echoed_pid(stub, capsule, info.pid)
        await stub.DestroyCapsule(pb.CapsuleRef(capsule_id=capsule))
        assert not (tmp_path / "agent/capsules" / capsule).exists()
        assert not process_alive(info)
        await eventually(lambda: not capsule_alive(capsule, background), what="the background sleep's death")
        error = await grpc_error(stub.GetCapsule(pb.CapsuleRef(capsule_id=capsule)))
        assert error.code() is grpc.StatusCode.NOT_FOUND
        error = await grpc_error(stub.DestroyCapsule(pb.CapsuleRef(capsule_id=capsule)))
        assert error.code() is grpc.StatusCode.NOT_FOUND

    async def test_unknown_capsules_are_not_found(self, stub: Any) -> None:
        calls = [
            stub.GetCapsule(pb.CapsuleRef(capsule_id="nope")),
            stub.Exec(pb.ExecRequest(capsule_id="nope", cmd="true")),
            stub.StartProcess(pb.StartRequest(capsule_id="nope", cmd="true")),
            stub.ListProcesses(pb.CapsuleRef(capsule_id="nope")),
        ]
        for call in calls:
            error = await grpc_error(call)
            assert error.code() is grpc.StatusCode.NOT_FOUND
            assert "nope" in error.details()

    async def test_malformed_capsule_ids(self, stub: Any) -> None:
        for capsule_id in ("", "..", "../etc", "a/b", ".hidden", "x" * 65):
            error = await grpc_error(stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule_id)))
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, capsule_id


class TestAgent:
    async def test_health_is_serving(self, tmp_path: Path) -> None:
        settings = agent_settings(tmp_path)
        handle = await start_agent("127.0.0.1:0", settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await handle.stop()

    async def test_stop_leaves_no_process_behind(self, tmp_path: Path) -> None:
        settings = agent_settings(tmp_path)
        handle = await start_agent("127.0.0.1:0", settings)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
            info = await start_sh(stub, "c1", "trap '' TERM; sleep 1000")
        await handle.stop()
        await eventually(lambda: not process_alive(info), what="the process's death")

    async def test_a_restarted_agent_keeps_its_capsules(self, tmp_path: Path) -> None:
        settings = agent_settings(tmp_path)
        for round_ in range(2):
            handle = await start_agent("127.0.0.1:0", settings)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                    stub = agent_pb2_grpc.AgentStub(channel)
                    if round_ == 0:
                        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="kept"))
                    else:
                        info = await stub.GetCapsule(pb.CapsuleRef(capsule_id="kept"))
                        assert info.running_processes == 0
            finally:
                await handle.stop()


async def connect(port: int) -> tuple[grpc.aio.Channel, Any]:
    """A channel and stub to an agent that may still be starting."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    async with asyncio.timeout(20):
        await channel.channel_ready()
    return channel, agent_pb2_grpc.AgentStub(channel)


class TestRunAgent:
    async def test_cancellation_stops_it_and_its_processes(self, tmp_path: Path) -> None:
        port = free_port()
        task = asyncio.create_task(run_agent(f"127.0.0.1:{port}", agent_settings(tmp_path)))
        channel, stub = await connect(port)
        async with channel:
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
            info = await start_sh(stub, "c1", "sleep 1000")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: not process_alive(info), what="the process's death")

    async def test_sigterm_stops_it_and_its_processes(self, tmp_path: Path) -> None:
        port = free_port()
        script = (
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from app.agent.server import run_agent\n"
            "from app.config import Settings\n"
            "asyncio.run(run_agent(sys.argv[1], Settings(data_dir=Path(sys.argv[2]), runtime=sys.argv[3])))\n"
        )
        agent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            f"127.0.0.1:{port}",
            str(tmp_path),
            TEST_RUNTIME,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            channel, stub = await connect(port)
            async with channel:
                await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
                info = await start_sh(stub, "c1", "trap '' TERM; sleep 1000")
            agent.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                _, stderr = await agent.communicate()
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
        assert agent.returncode == 0, stderr.decode()
        await eventually(lambda: not process_alive(info), what="the process's death")

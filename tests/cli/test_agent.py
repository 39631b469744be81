"""`capsule agent` as a user runs it: a second one on the same data directory gives up and harms nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.helpers import start_sh
from tests.system import command_env, free_port, process_alive

CAPSULE = Path(sys.executable).parent / "capsule"


def _agent(data_dir: Path, address: str) -> subprocess.Popen[bytes]:
    environment = command_env()
    return subprocess.Popen(
        [str(CAPSULE), "agent", "--listen", address],
        env=environment | {"CAPSULE_DATA_DIR": str(data_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def _ended(process: subprocess.Popen[bytes], what: str) -> tuple[int, str]:
    try:
        async with asyncio.timeout(20):
            _, stderr = await asyncio.to_thread(process.communicate)
    except TimeoutError:
        pytest.fail(f"{what} kept running")
    return process.returncode, stderr.decode()


async def test_a_second_agent_on_the_same_data_leaves_the_first_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    address = f"127.0.0.1:{free_port()}"
    first = _agent(data_dir, address)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            async with asyncio.timeout(20):
                await channel.channel_ready()
            stub: Any = agent_pb2_grpc.AgentStub(channel)
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
            info = await start_sh(stub, "c1", "sleep 1000")

            second = _agent(data_dir, f"127.0.0.1:{free_port()}")
            try:
                code, stderr = await _ended(second, "a second agent on a data directory in use")
            finally:
                _kill(second)
            assert code != 0
            assert str(data_dir.resolve()) in stderr and f"process {first.pid}" in stderr, stderr
            assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr

            assert process_alive(info), "a refused start must not kill what the running agent supervises"
            assert (await stub.GetCapsule(pb.CapsuleRef(capsule_id="c1"))).running_processes == 1
        first.send_signal(signal.SIGTERM)
        code, stderr = await _ended(first, "the first agent after SIGTERM")
        assert code == 0, stderr
        assert not process_alive(info)
    finally:
        _kill(first)

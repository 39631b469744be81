"""An agent killed outright leaves its processes running; the next agent on the same data ends them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from app.agent.leftovers import session_members
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.conftest import MakeStub
from tests.agent.helpers import eventually, start_sh, wait_output
from tests.system import free_port, is_alive


async def test_next_agent_kills_what_a_killed_agent_left(tmp_path: Path, make_stub: MakeStub) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = os.environ | {"CAPSULE_DATA_DIR": str(tmp_path)}
    agent = subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", "agent", "--listen", address], env=env, start_new_session=True
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            await channel.channel_ready()
            await stub.CreateCapsule(pb.CapsuleRef(capsule_id="c1"))
            await start_sh(stub, "c1", "sleep 1000 & echo child $!; sleep 1000", tag="family")
            await wait_output(stub, "c1", "family", b"child ")
            listed = await stub.ListProcesses(pb.CapsuleRef(capsule_id="c1"))
            leader = listed.processes[0].pid
            family = session_members(leader)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        assert len(family) >= 2 and all(is_alive(pid) for pid in family), "killed outright, it leaves them"

        stub = await make_stub()  # a new agent on the same data directory
        info = await stub.GetCapsule(pb.CapsuleRef(capsule_id="c1"))
        assert info.running_processes == 0
        await eventually(lambda: not any(is_alive(pid) for pid in family), what="leftovers killed")
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()

"""The embedded agent called in this process (app.hosts.local): what a gRPC channel does, it does."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import grpc
import pytest

from app import domain
from app.agent import tally
from app.agent.server import AgentHandle
from app.config import Settings
from app.errors import HostUnavailable
from app.hosts.pool import HostPool
from app.pb import agent_pb2 as pb
from tests.hosts.conftest import local_link
from tests.hosts.helpers import DEADLINE, next_batch, sh, stdout_of


@pytest.fixture
async def local_pool(settings: Settings, agent: AgentHandle) -> HostPool:
    pool = HostPool(settings)
    pool.set_hosts({"h1": agent.address})
    pool.set_local("h1", local_link(agent))
    return pool


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_health_check_answers(local_pool: HostPool, agent: AgentHandle) -> None:
    client = local_pool.client("h1")
    assert await client.answers(1.0)
    await agent.stop()
    assert not await client.answers(1.0)
    await local_pool.close()


async def test_a_stopped_agent_is_unavailable(local_pool: HostPool, agent: AgentHandle) -> None:
    client = local_pool.client("h1")
    await client.create_capsule("cap-stopping")
    await agent.stop()
    with pytest.raises(HostUnavailable, match="cannot be reached"):
        await client.list_capsules()
    with pytest.raises(HostUnavailable, match="cannot be reached"):
        await anext(client.stream_output("cap-stopping", "1", 0))
    await local_pool.close()


async def test_a_reader_that_goes_ends_the_stream_in_the_agent(local_pool: HostPool) -> None:
    client = local_pool.client("h1")
    await client.create_capsule("cap-reader")
    await client.start_process("cap-reader", sh("echo ready; sleep 30", tag="long"))
    before = tally.TALLY.streams_open
    stream = client.stream_output("cap-reader", "long", 0)
    assert stdout_of(await next_batch(stream)) == b"ready\n"
    assert tally.TALLY.streams_open == before + 1
    await stream.aclose()
    await eventually(lambda: tally.TALLY.streams_open == before)
    await client.stop_process("cap-reader", "long", grace_sec=1.0)
    await local_pool.close()


async def test_a_call_past_its_deadline_ends_as_grpc_says(local_pool: HostPool, agent: AgentHandle) -> None:
    client = local_pool.client("h1")
    await client.create_capsule("cap-slow")
    script = "trap '' TERM; echo ready; sleep 30"
    await client.start_process("cap-slow", sh(script, tag="stubborn"))
    stream = client.stream_output("cap-slow", "stubborn", 0)
    assert stdout_of(await next_batch(stream)) == b"ready\n"  # its trap is set
    await stream.aclose()
    stop = pb.StopRequest(process=pb.ProcessRef(capsule_id="cap-slow", selector="stubborn"), grace_sec=30)
    stub = local_link(agent).stub
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.StopProcess(stop, timeout=0.2)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as missing:  # an error of the agent keeps its status
        await stub.GetProcess(pb.ProcessRef(capsule_id="cap-slow", selector="nobody"), timeout=1.0)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no process nobody" in (missing.value.details() or "")
    await client.signal_process("cap-slow", "stubborn", signal=signal.SIGKILL, scope=domain.SignalScope.GROUP)
    await local_pool.close()

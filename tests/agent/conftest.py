"""A real agent on 127.0.0.1:0 with its data under tmp_path, and a gRPC stub to call it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from app.agent.server import AgentHandle, start_agent
from app.config import Settings
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.system import TEST_RUNTIME

CAPSULE = "c1"
# Small limits keep the tests fast; a test needing others passes overrides to make_stub.
TEST_SETTINGS: dict[str, Any] = {
    "output_cap_bytes": 1024 * 1024,
    "retention_sec": 60.0,
    "exec_output_cap_bytes": 1024 * 1024,
    "exec_default_timeout_sec": 10.0,
    "input_timeout_sec": 0.5,
}

MakeStub = Callable[..., Awaitable[Any]]


def agent_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test agent: the test limits, then the overrides."""
    return dataclasses.replace(
        Settings(data_dir=data_dir, runtime=TEST_RUNTIME), **(TEST_SETTINGS | overrides)
    )


@pytest.fixture
async def make_stub(tmp_path: Path) -> AsyncIterator[MakeStub]:
    """Starts an agent with the given settings overrides; returns a stub bound to it."""
    handles: list[AgentHandle] = []
    channels: list[grpc.aio.Channel] = []

    async def make(**overrides: Any) -> Any:
        handle = await start_agent("127.0.0.1:0", agent_settings(tmp_path, **overrides))
        handles.append(handle)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
        channels.append(channel)
        return agent_pb2_grpc.AgentStub(channel)

    yield make
    for channel in channels:
        await channel.close()
    for handle in handles:
        await handle.stop()


@pytest.fixture
async def stub(make_stub: MakeStub) -> Any:
    """A stub of an agent with the test settings."""
    return await make_stub()


@pytest.fixture
async def capsule(stub: Any) -> str:
    """The id of a created capsule."""
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=CAPSULE))
    return CAPSULE


def workspace_on_host(data_dir: Path, capsule_id: str) -> Path:
    """Where a capsule's workspace lies on the host (its processes may see it as /workspace)."""
    return data_dir / "agent" / "capsules" / capsule_id / "workspace"

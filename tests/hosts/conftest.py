"""A real host agent on loopback and a pool pointing at it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.agent.server import AgentHandle, start_agent
from app.config import Settings
from app.hosts.client import HostClient
from app.hosts.local import LocalAgent
from app.hosts.pool import HostPool
from tests.system import TEST_RUNTIME


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        runtime=TEST_RUNTIME,
        data_dir=tmp_path / "data",
        host_connect_timeout_sec=2.0,
        host_call_timeout_sec=10.0,
        exec_default_timeout_sec=10.0,
    )


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[AgentHandle]:
    handle = await start_agent("127.0.0.1:0", settings)
    yield handle
    await handle.stop()


@pytest.fixture
async def pool(settings: Settings, agent: AgentHandle) -> AsyncIterator[HostPool]:
    pool = HostPool(settings)
    pool.set_hosts({"h1": f"127.0.0.1:{agent.port}"})
    yield pool
    await pool.close()


def local_link(agent: AgentHandle) -> LocalAgent:
    """The agent of this process, called without gRPC, as the embedded default calls it."""
    return LocalAgent(agent.servicer, agent.health, lambda: agent.stopped)


@pytest.fixture(params=["grpc", "local"])
def client(request: pytest.FixtureRequest, pool: HostPool, agent: AgentHandle) -> HostClient:
    """A client of the agent through its gRPC channel, and one calling it in this process."""
    if request.param == "local":
        pool.set_local("h1", local_link(agent))
    return pool.client("h1")


@pytest.fixture
async def capsule_id(client: HostClient) -> str:
    capsule_id = f"cap-{uuid.uuid4().hex[:12]}"
    await client.create_capsule(capsule_id)
    return capsule_id

"""A real API server on loopback (uvicorn), with its embedded host agent and a real database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import uvicorn

from app.agent.server import AgentHandle, start_agent
from app.cli.ws_protocol import uvicorn_protocols
from app.config import Settings
from app.main import create_app
from app.state import AppState
from tests.e2e.client import HttpClient
from tests.system import TEST_RUNTIME


@dataclass
class Server:
    """A running API server."""

    url: str
    ws_url: str
    state: AppState

    async def new_key(self, team: str) -> str:
        _, key = await self.state.platform.keys.create_key(team)
        return key


@asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[Server]:
    """Serves create_app(settings) on a free loopback port until the block ends."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **uvicorn_protocols()
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Server(
            url=f"http://127.0.0.1:{port}/graphql",
            ws_url=f"ws://127.0.0.1:{port}/graphql",
            state=app.state.capsule,
        )
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        runtime=TEST_RUNTIME,
        data_dir=tmp_path / "data",
        database_url=database_url,
        retention_sec=60.0,
        output_cap_bytes=4 * 1024 * 1024,
        exec_output_cap_bytes=64 * 1024,
        idle_check_interval_sec=0.2,
        # Far above what any test asks for; tests/e2e/test_rate_limits.py sets budgets of its own.
        team_requests_per_sec=1000.0,
    )


@pytest.fixture
async def agent(settings: Settings) -> AsyncIterator[AgentHandle]:
    """A host agent alone on loopback, for servers configured with hosts (several replicas)."""
    handle = await start_agent("127.0.0.1:0", replace(settings, data_dir=settings.data_dir / "agent"))
    yield handle
    await handle.stop()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Server]:
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def key(server: Server) -> str:
    return await server.new_key("team-a")


@pytest.fixture
async def api(server: Server, key: str) -> AsyncIterator[HttpClient]:
    client = HttpClient(server.url, key)
    yield client
    await client.aclose()


@pytest.fixture
async def capsule_id(api: HttpClient) -> str:
    return str((await api.run("CreateCapsule")).ok()["createCapsule"]["id"])

"""Faults caused for real under live subscriptions: the agent killed, the bus connection dropped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import pytest
from gql.transport.exceptions import TransportQueryError

from app.config import Settings
from tests.bus.test_broadcast import kill_redis_connections
from tests.e2e.client import HttpClient, live_events, subscribe, ws_session
from tests.e2e.conftest import running_server
from tests.e2e.test_errors import agent_process  # noqa: F401  (a fixture)
from tests.e2e.test_processes import start


def _code(error: BaseException) -> Any:
    assert isinstance(error, TransportQueryError), repr(error)
    return (error.errors or [{}])[0].get("extensions", {}).get("code")


async def test_agent_killed_under_process_output(
    settings: Settings,
    agent_process: tuple[subprocess.Popen[bytes], str],  # noqa: F811
) -> None:
    process, address = agent_process
    async with running_server(replace(settings, hosts={"h1": address})) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            await start(api, capsule_id, "sh", "-c", "echo first; exec sleep 1000", tag="watched")
            async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
                stream = subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector="watched")
                async with asyncio.timeout(30):
                    first = await anext(stream)
                    assert first["processOutput"]["data"] == "first\n"
                    os.killpg(process.pid, signal.SIGKILL)
                    with pytest.raises(TransportQueryError) as caught:
                        await anext(stream)
            assert _code(caught.value) == "HOST_UNAVAILABLE"
            # The server stays up and says the same to the next caller, quickly.
            answer = await api.run("StartProcess", capsuleId=capsule_id, input={"cmd": "true"})
            assert answer.codes == ["HOST_UNAVAILABLE"]
        finally:
            await api.aclose()


async def test_bus_dropped_under_process_events(settings: Settings) -> None:
    async with running_server(replace(settings, bus_url="redis://127.0.0.1:6379")) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]

            def probe() -> Awaitable[object]:
                return start(api, capsule_id, "true")

            url = server.ws_url
            async with asyncio.timeout(20):
                async with live_events(
                    url, key, "graphql-transport-ws", capsule_id, until_tag="never", start_probe=probe
                ) as listener:
                    assert await kill_redis_connections() > 0
                    with pytest.raises(TransportQueryError) as caught:
                        await listener
            assert _code(caught.value) == "UNAVAILABLE"
            assert "bus" in str(caught.value)
            # What survives: processes still start and are recorded, and a new subscription works.
            async with asyncio.timeout(20):
                async with live_events(
                    url, key, "graphql-ws", capsule_id, until_tag="after", start_probe=probe
                ) as listener:
                    await start(api, capsule_id, "true", tag="after")
                    seen = await listener
            assert ("EXITED", "after") in seen
        finally:
            await api.aclose()

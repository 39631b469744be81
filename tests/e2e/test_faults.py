"""Faults caused for real under live subscriptions: the agent killed, the bus connection dropped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import replace
from typing import Any

import pytest
from gql.transport.exceptions import TransportQueryError
from sqlalchemy.engine import make_url

from app.config import Settings
from tests.bus.test_broadcast import kill_redis_connections
from tests.e2e.client import HttpClient, subscribe, ws_session
from tests.e2e.conftest import running_server
from tests.e2e.test_errors import agent_process  # noqa: F401  (a fixture)
from tests.e2e.test_event_cursor import assert_each_once, following, run_to_exit, until_live
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
    # No poll to speak of: the subscription hears of later events through the bus it reconnected.
    config = replace(settings, bus_url="redis://127.0.0.1:6379", events_poll_sec=3600.0)
    async with running_server(config) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            async with following(server.ws_url, key, "graphql-transport-ws", capsule_id) as follower:
                await until_live(api, capsule_id, [follower])
                assert await kill_redis_connections() > 0
                # The subscription goes on: what happens from now on reaches it once the bus is back.
                await run_to_exit(api, capsule_id, "after")
                await follower.exited(["after"])
                assert follower.task is not None and not follower.task.done()
            assert_each_once(follower, ["after"])
        finally:
            await api.aclose()


class StoreProxy:
    """A TCP relay to PostgreSQL that a test can cut, as a network fault would."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Refuses new connections and resets the open ones."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_store_unreachable_under_process_events(settings: Settings) -> None:
    url = make_url(settings.database_url)
    proxy = StoreProxy(url.port or 5432)
    relayed = url.set(port=await proxy.start()).render_as_string(hide_password=False)
    config = replace(settings, database_url=relayed, events_poll_sec=0.2)
    async with running_server(config) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            async with following(server.ws_url, key, "graphql-ws", capsule_id) as follower:
                await until_live(api, capsule_id, [follower])
                proxy.cut()
                assert follower.task is not None
                with pytest.raises(TransportQueryError) as caught:
                    async with asyncio.timeout(20):
                        await follower.task
            assert _code(caught.value) == "UNAVAILABLE"
            assert "database cannot be reached" in str(caught.value)
        finally:
            await api.aclose()

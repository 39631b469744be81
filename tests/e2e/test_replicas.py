"""Two API replicas on one database and one Redis bus, in front of one host agent."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from app.agent.server import AgentHandle, start_agent
from app.config import Settings
from tests.e2e.client import HttpClient, live_events
from tests.e2e.conftest import running_server
from tests.e2e.test_keys import (
    DEADLINE_SEC,
    TICKER,
    assert_unauthenticated,
    followed,
    key_id,
    revoke_with_the_cli,
    until_live,
)
from tests.e2e.test_processes import start, wait_for_status


@pytest.mark.parametrize("bus_url", ["redis://127.0.0.1:6379", "postgres://postgres@127.0.0.1:5432/test"])
async def test_events_reach_every_replica(settings: Settings, agent: AgentHandle, bus_url: str) -> None:
    shared = replace(settings, hosts={"h1": f"127.0.0.1:{agent.port}"}, bus_url=bus_url)
    async with running_server(shared) as first, running_server(shared) as second:
        key = await first.new_key("team-a")
        api, other = HttpClient(first.url, key), HttpClient(second.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            async with asyncio.timeout(15):
                async with live_events(
                    second.ws_url,
                    key,
                    "graphql-transport-ws",
                    capsule_id,
                    until_tag="final",
                    start_probe=lambda: start(api, capsule_id, "true"),
                ) as listener:
                    await start(api, capsule_id, "sh", "-c", "exit 3", tag="final")
                    seen = await listener
            assert seen.count(("EXITED", "final")) == 1
            # Both replicas follow the agent; the exit is on record for either of them.
            record = await wait_for_status(other, capsule_id, "final", "EXITED")
            assert record["exitCode"] == 3
        finally:
            await api.aclose()
            await other.aclose()


async def test_a_host_registered_while_serving_takes_capsules(
    settings: Settings, agent: AgentHandle, tmp_path: Path
) -> None:
    second_agent = await start_agent("127.0.0.1:0", replace(settings, data_dir=tmp_path / "second"))
    try:
        async with running_server(replace(settings, hosts={"h1": f"127.0.0.1:{agent.port}"})) as server:
            api = HttpClient(server.url, await server.new_key("team-a"))
            try:
                first = (await api.run("CreateCapsule")).ok()["createCapsule"]
                assert first["hostId"] == "h1"
                await server.state.platform.hosts.register("h2", f"127.0.0.1:{second_agent.port}")
                second = (await api.run("CreateCapsule")).ok()["createCapsule"]
                assert second["hostId"] == "h2"  # the one with fewer capsules
                ran = await api.run("Exec", capsuleId=second["id"], input={"cmd": "echo", "args": ["there"]})
                assert ran.ok()["exec"]["stdout"] == "there\n"
            finally:
                await api.aclose()
    finally:
        await second_agent.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_revocation_reaches_every_replicas_sockets(
    settings: Settings, agent: AgentHandle, tmp_path: Path
) -> None:
    # A re-check once an hour: only the bus message from the CLI can end these subscriptions in time.
    shared = replace(
        settings,
        hosts={"h1": f"127.0.0.1:{agent.port}"},
        bus_url="redis://127.0.0.1:6379",
        key_recheck_interval_sec=3600,
    )
    async with running_server(shared) as first, running_server(shared) as second, AsyncExitStack() as stack:
        key, other = await first.new_key("team-a"), await first.new_key("team-a")
        api, other_api = HttpClient(first.url, key), HttpClient(second.url, other)
        stack.push_async_callback(api.aclose)
        stack.push_async_callback(other_api.aclose)
        capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
        ticker = (await start(api, capsule_id, "sh", "-c", TICKER, tag="ticker"))["pid"]
        followers = []
        for server in (first, second):
            followers += await stack.enter_async_context(
                followed(stack, server.ws_url, key, capsule_id, ticker)
            )
        kept = await stack.enter_async_context(followed(stack, second.ws_url, other, capsule_id, ticker))
        await until_live(api, capsule_id, followers + kept)

        await revoke_with_the_cli(shared, tmp_path, await key_id(first, key))

        async with asyncio.timeout(DEADLINE_SEC):
            for follower in followers:
                assert_unauthenticated(await follower.ended())
        revoked = HttpClient(second.url, key)
        stack.push_async_callback(revoked.aclose)
        assert (await revoked.run("Capsules")).codes == ["UNAUTHENTICATED"]
        for follower in kept:
            assert not follower.task.done()
        assert (await other_api.run("Capsule", id=capsule_id)).ok()["capsule"]["id"] == capsule_id

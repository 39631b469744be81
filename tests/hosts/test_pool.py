"""The pool's channels: unknown and dead hosts, moved hosts, agents that die under a stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from app.agent.server import AgentHandle, start_agent
from app.config import Settings
from app.errors import HostUnavailable
from app.hosts.client import HostClient
from app.hosts.pool import HostPool
from tests.hosts.conftest import local_link
from tests.hosts.helpers import DEADLINE, collect_output, next_batch, sh, stdout_of
from tests.system import TEST_RUNTIME, sandboxed

MARGIN_SEC = 1.5

# An agent in a process of its own, so the test can kill it outright.
AGENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from app.agent.server import start_agent
from app.config import Settings
from tests.system import TEST_RUNTIME, sandboxed

async def main() -> None:
    handle = await start_agent("127.0.0.1:0", Settings(data_dir=Path(sys.argv[1]), runtime=TEST_RUNTIME))
    print(handle.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def kill_orphan(pid: int) -> None:
    """Ends the process group a dead plain agent left; a sandbox's processes ended with it, and their
    PIDs are the capsule's own, not the host's."""
    if not sandboxed():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word, like a hung agent."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def hung_agent() -> AsyncIterator[int]:
    """A gRPC server that takes every ListCapsules call and never answers it."""

    async def hang(request: bytes, context: object) -> bytes:
        await asyncio.Event().wait()
        return b""

    handler = grpc.method_handlers_generic_handler(
        "capsule.agent.v1.Agent", {"ListCapsules": grpc.unary_unary_rpc_method_handler(hang)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def agent_process(data_dir: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT_SCRIPT, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(DEADLINE):
            port = int(await process.stdout.readline())
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def assert_unavailable_in_time(client: HostClient, settings: Settings) -> None:
    """Both a unary call and a stream give up within the connect timeout (plus a margin)."""
    began = time.monotonic()
    with pytest.raises(HostUnavailable, match="cannot be reached"):
        await client.list_capsules()
    assert time.monotonic() - began < settings.host_connect_timeout_sec + MARGIN_SEC
    began = time.monotonic()
    with pytest.raises(HostUnavailable, match="cannot be reached"):
        await collect_output(client, "cap-1", "proc")
    assert time.monotonic() - began < settings.host_connect_timeout_sec + MARGIN_SEC


async def test_an_unknown_host_is_unavailable(pool: HostPool) -> None:
    with pytest.raises(HostUnavailable, match="host h9 is not registered"):
        pool.client("h9")


async def test_a_closed_port_is_unavailable_in_time(settings: Settings) -> None:
    pool = HostPool(settings)
    pool.set_hosts({"dead": f"127.0.0.1:{closed_port()}"})
    try:
        await assert_unavailable_in_time(pool.client("dead"), settings)
    finally:
        await pool.close()


async def test_a_silent_host_is_unavailable_in_time(settings: Settings) -> None:
    settings = dataclasses.replace(settings, host_connect_timeout_sec=1.0)  # this one waits it out
    pool = HostPool(settings)
    async with silent_server() as port:
        pool.set_hosts({"hung": f"127.0.0.1:{port}"})
        try:
            await assert_unavailable_in_time(pool.client("hung"), settings)
        finally:
            await pool.close()


async def test_a_call_past_its_deadline_is_unavailable(settings: Settings) -> None:
    pool = HostPool(dataclasses.replace(settings, host_call_timeout_sec=0.3))
    async with hung_agent() as port:
        pool.set_hosts({"slow": f"127.0.0.1:{port}"})
        try:
            async with asyncio.timeout(DEADLINE):
                with pytest.raises(HostUnavailable, match="did not answer in time"):
                    await pool.client("slow").list_capsules()
        finally:
            await pool.close()


async def test_set_hosts_follows_a_moved_host(settings: Settings, agent: AgentHandle, tmp_path: Path) -> None:
    other = await start_agent("127.0.0.1:0", Settings(data_dir=tmp_path / "other", runtime=TEST_RUNTIME))
    pool = HostPool(settings)
    try:
        pool.set_hosts({"h1": f"127.0.0.1:{agent.port}"})
        await pool.client("h1").create_capsule("cap-first")
        pool.set_hosts({"h1": f"127.0.0.1:{other.port}"})
        assert [c.capsule_id for c in await pool.client("h1").list_capsules()] == []
        pool.set_hosts({})
        with pytest.raises(HostUnavailable):
            pool.client("h1")
    finally:
        await pool.close()
        await other.stop()


@pytest.mark.parametrize("link", ["grpc", "local"])
async def test_closing_the_pool_ends_streams(settings: Settings, agent: AgentHandle, link: str) -> None:
    pool = HostPool(settings)
    pool.set_hosts({"h1": f"127.0.0.1:{agent.port}"})
    if link == "local":
        pool.set_local("h1", local_link(agent))
    client = pool.client("h1")
    await client.create_capsule("cap-closing")
    await client.start_process("cap-closing", sh("echo ready; sleep 30", tag="long"))
    stream = client.stream_output("cap-closing", "long", 0)
    try:
        assert stdout_of(await next_batch(stream)) == b"ready\n"
        reader = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)  # let it wait for the next message
        await pool.close()
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(HostUnavailable):
                await reader
        with pytest.raises(HostUnavailable):  # and the pool takes no new call
            await client.list_capsules()
    finally:
        await stream.aclose()


async def test_an_agent_killed_mid_stream_is_unavailable(settings: Settings, tmp_path: Path) -> None:
    pool = HostPool(settings)
    async with agent_process(tmp_path / "agent") as (process, port):
        pool.set_hosts({"h1": f"127.0.0.1:{port}"})
        client = pool.client("h1")
        await client.create_capsule("cap-killed")
        info = await client.start_process("cap-killed", sh("echo ready; sleep 30"))
        stream = client.stream_output("cap-killed", str(info.pid), 0)
        try:
            assert stdout_of(await next_batch(stream)) == b"ready\n"
            process.kill()
            with pytest.raises(HostUnavailable):
                await next_batch(stream)
        finally:
            await stream.aclose()
            await pool.close()
            kill_orphan(info.pid)


async def test_a_quiet_stream_outlives_keepalive_pings(settings: Settings, agent: AgentHandle) -> None:
    # Pings every second; an agent that turns away frequent pings sends GOAWAY after about three.
    pool = HostPool(settings, keepalive_time_ms=1000)
    pool.set_hosts({"h1": f"127.0.0.1:{agent.port}"})
    try:
        client = pool.client("h1")
        await client.create_capsule("cap-quiet")
        await client.start_process("cap-quiet", sh("echo ready; sleep 4; echo done", tag="quiet"))
        assert stdout_of(await collect_output(client, "cap-quiet", "quiet")) == b"ready\ndone\n"
    finally:
        await pool.close()


async def test_a_frozen_agent_is_noticed_on_a_quiet_stream(settings: Settings, tmp_path: Path) -> None:
    # A stopped process keeps its sockets open: only unanswered keepalive pings reveal it.
    pool = HostPool(settings, keepalive_time_ms=1000)
    async with agent_process(tmp_path / "agent") as (process, port):
        pool.set_hosts({"h1": f"127.0.0.1:{port}"})
        client = pool.client("h1")
        await client.create_capsule("cap-frozen")
        info = await client.start_process("cap-frozen", sh("echo ready; sleep 30"))
        stream = client.stream_output("cap-frozen", str(info.pid), 0)
        try:
            assert stdout_of(await next_batch(stream)) == b"ready\n"
            process.send_signal(signal.SIGSTOP)
            with pytest.raises(HostUnavailable):
                await next_batch(stream)
        finally:
            await stream.aclose()
            await pool.close()
            process.kill()
            kill_orphan(info.pid)

"""A host agent that stops answering (SIGSTOP) under an API server: no capsule is stopped on paper only."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.config import Settings
from tests.e2e.client import HttpClient
from tests.e2e.conftest import running_server
from tests.system import capsule_alive, command_env, free_port, ready_spares, sandboxed

CAPSULE = Path(sys.executable).parent / "capsule"
DEADLINE = 30


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`capsule agent` in a process of its own, so it can be frozen and thawed."""
    address = f"127.0.0.1:{free_port()}"
    env = command_env()
    env["CAPSULE_DATA_DIR"] = str(tmp_path / "agent-data")
    agent = subprocess.Popen(
        [str(CAPSULE), "agent", "--listen", address],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield agent, address
    finally:
        agent.send_signal(signal.SIGCONT)
        agent.terminate()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


async def sandbox_ready(data_dir: Path) -> None:
    """Returns once the agent on data_dir holds a spare sandbox, so that a capsule's creation costs a
    rename within the tests' short call deadline, not a sandbox's start (at once on plain)."""
    if not sandboxed():
        return
    async with asyncio.timeout(DEADLINE):
        while not ready_spares(data_dir):
            await asyncio.sleep(0.05)


async def listening(address: str) -> None:
    host, port = address.rsplit(":", 1)
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return
            except OSError:
                await asyncio.sleep(0.05)


@pytest.fixture
async def api(
    settings: Settings, agent_process: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> AsyncIterator[HttpClient]:
    _, address = agent_process
    await listening(address)
    await sandbox_ready(tmp_path / "agent-data")
    settings = dataclasses.replace(
        settings,
        hosts={"h1": address},
        host_call_timeout_sec=1.0,
        host_connect_timeout_sec=1.0,
        reconcile_interval_sec=0.5,
    )
    async with running_server(settings) as server:
        client = HttpClient(server.url, await server.new_key("team-a"))
        try:
            yield client
        finally:
            await client.aclose()


async def status_of(api: HttpClient, capsule_id: str) -> str:
    answer = await api.query("query($id: ID!) { capsule(id: $id) { status } }", id=capsule_id)
    return str(answer.ok()["capsule"]["status"])


async def process_status(api: HttpClient, capsule_id: str, pid: int) -> str:
    answer = await api.run("Process", capsuleId=capsule_id, selector=str(pid))
    return str(answer.ok()["process"]["status"])


async def until_status(api: HttpClient, capsule_id: str, wanted: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while await status_of(api, capsule_id) != wanted:
            await asyncio.sleep(0.05)


async def sleeper(api: HttpClient, *, timeout_sec: int) -> tuple[str, int]:
    created = await api.run("CreateCapsule", timeoutSec=timeout_sec)
    capsule_id = str(created.ok()["createCapsule"]["id"])
    started = await api.run("StartProcess", capsuleId=capsule_id, input={"cmd": "sleep", "args": ["1000"]})
    return capsule_id, int(started.ok()["startProcess"]["pid"])


async def test_the_idle_reaper_waits_for_a_frozen_host(
    api: HttpClient, agent_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    agent, _ = agent_process
    capsule_id, pid = await sleeper(api, timeout_sec=2)
    agent.send_signal(signal.SIGSTOP)  # the host stops answering; its processes go on
    await until_status(api, capsule_id, "STOPPING")
    assert capsule_alive(capsule_id, pid)
    assert await process_status(api, capsule_id, pid) == "RUNNING"
    agent.send_signal(signal.SIGCONT)
    await until_status(api, capsule_id, "STOPPED")
    assert not capsule_alive(capsule_id, pid)
    assert await process_status(api, capsule_id, pid) == "EXITED"


async def test_destroy_on_a_frozen_host_finishes_once_it_answers(
    api: HttpClient, agent_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    agent, _ = agent_process
    capsule_id, pid = await sleeper(api, timeout_sec=600)
    agent.send_signal(signal.SIGSTOP)
    destroyed = await api.run("DestroyCapsule", id=capsule_id)
    assert destroyed.ok()["destroyCapsule"]["status"] == "STOPPING"
    assert capsule_alive(capsule_id, pid)
    agent.send_signal(signal.SIGCONT)
    await until_status(api, capsule_id, "STOPPED")
    assert not capsule_alive(capsule_id, pid)
    assert await process_status(api, capsule_id, pid) == "EXITED"

"""The agent's own metrics, per capsule, in whichever runtime the tests use: bytes read from its
processes' pipes, the log bytes held and the evictions past the log cap, on the embedded agent's page
(serve's /metrics) and on a separate `capsule agent --metrics`'s. In the sandbox runtime the
sandbox's supervisor counts them and the agent asks it for them in the background while scraped, so
they show up a moment after the first scrape, and no scrape waits on a sandbox."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.agent.capsules import COUNTERS_DEADLINE_SEC, COUNTERS_EVERY_SEC
from app.agent.child import MAX_READ_BYTES
from app.agent.output_log import EVENT_OVERHEAD_BYTES
from app.config import Settings
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.helpers import eventually, exec_sh, start_sh, wait_exited
from tests.agent.test_usage import cgroup_sandbox
from tests.e2e.client import HttpClient
from tests.e2e.conftest import running_server
from tests.e2e.test_operations import Samples, base_url, value
from tests.e2e.test_processes import start, wait_for_status
from tests.system import CAPSULE_CGROUP, command_env, free_port

CAPSULE = Path(sys.executable).parent / "capsule"
DEADLINE_SEC = 15.0
CAP_BYTES = 256 * 1024  # the output log's cap in these tests
TALKED = 10_000  # what the talker writes: well under the cap
FLOODED = 2 * 1024 * 1024  # what the flood writes: eight caps
TALKER = f"yes abcd | head -c {TALKED}"
FLOOD = f"yes abcdefghijklmnopqrstuvwxyz | head -c {FLOODED}"


async def scrape(url: str) -> tuple[Samples, float]:
    """Every sample of a metrics page, parsed by prometheus_client's parser, and how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url)
    took = loop.time() - started
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, took


async def counted(url: str, talker: str, flood: str) -> Samples:
    """The page once it counts every byte both capsules' processes wrote, and the state they ended in.

    A sandbox's counters reach the agent a moment after a scrape asks (each scrape answers at once,
    with the last answer), so a page may show an answer taken before the last exit went into the log.
    Two pages a whole refresh apart that agree hold no such answer: a refresh began and ended between
    them, after the exits."""
    last: Samples = {}
    loop = asyncio.get_running_loop()
    settled: tuple[float, Samples] | None = None
    try:
        async with asyncio.timeout(DEADLINE_SEC):
            while True:
                last, took = await scrape(url)
                assert took < 1.0, f"a scrape took {took:.2f} s"
                now = loop.time()
                if not (
                    value(last, "capsule_agent_pipe_bytes_total", capsule=talker) == TALKED
                    and value(last, "capsule_agent_pipe_bytes_total", capsule=flood) == FLOODED
                ):
                    settled = None
                elif settled is None or settled[1] != _agent_samples(last):
                    settled = (now, _agent_samples(last))
                elif now - settled[0] >= COUNTERS_EVERY_SEC + COUNTERS_DEADLINE_SEC:
                    return last
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"the agent's page never counted the output: {_agent_samples(last)}")


def _agent_samples(samples: Samples) -> Samples:
    return {k: v for k, v in samples.items() if k[0].startswith("capsule_agent_")}


def assert_counted(samples: Samples, talker: str, flood: str) -> None:
    """What the talker's and the flood's capsules show, each under its own capsule label."""

    def of(name: str, capsule: str) -> float:
        return value(samples, name, capsule=capsule)

    # The talker: every byte held, each event (its chunks and the exit) costing its overhead on top.
    held = of("capsule_agent_log_bytes_held", talker)
    overhead = held - TALKED
    assert overhead >= 2 * EVENT_OVERHEAD_BYTES and overhead % EVENT_OVERHEAD_BYTES == 0, held
    assert of("capsule_agent_log_evictions_total", talker) == 0
    assert of("capsule_agent_log_evicted_bytes_total", talker) == 0
    # The flood: past the cap, so events went; what is held is what was not evicted, plus overheads.
    evictions = of("capsule_agent_log_evictions_total", flood)
    evicted = of("capsule_agent_log_evicted_bytes_total", flood)
    assert evictions >= 1 and 0 < evicted < FLOODED, (evictions, evicted)
    held = of("capsule_agent_log_bytes_held", flood)
    overhead = held - (FLOODED - evicted)
    assert overhead >= 2 * EVENT_OVERHEAD_BYTES and overhead % EVENT_OVERHEAD_BYTES == 0, (held, evicted)
    # Within the cap, unless the newest chunk alone is over it (it always stays).
    assert held <= max(CAP_BYTES, MAX_READ_BYTES + 2 * EVENT_OVERHEAD_BYTES), held
    for capsule in (talker, flood):
        assert of("capsule_agent_processes_running", capsule) == 0
    assert value(samples, "capsule_agent_capsules") == 2


async def test_the_embedded_agent_counts_each_capsules_pipe_bytes_log_bytes_and_evictions(
    settings: Settings,
) -> None:
    async with running_server(replace(settings, output_cap_bytes=CAP_BYTES)) as server:
        url = f"{base_url(server)}/metrics"
        await scrape(url)  # a first scrape: from now on the agent keeps its sandboxes' counters current
        api = HttpClient(server.url, await server.new_key("team-a"))
        try:
            talker = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            flood = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            await start(api, talker, "sh", "-c", TALKER, tag="talker")
            await start(api, flood, "sh", "-c", FLOOD, tag="flood")
            await wait_for_status(api, talker, "talker", "EXITED")
            await wait_for_status(api, flood, "flood", "EXITED")
            assert_counted(await counted(url, talker, flood), talker, flood)
            # A destroyed capsule's series go with it.
            (await api.run("DestroyCapsule", id=flood)).ok()
            after, _ = await scrape(url)
            assert ("capsule_agent_pipe_bytes_total", frozenset({("capsule", flood)})) not in after
            assert value(after, "capsule_agent_pipe_bytes_total", capsule=talker) == TALKED
        finally:
            await api.aclose()


def supervisors_of(capsule_id: str) -> list[int]:
    """The PIDs (the host's) of the supervisor in a capsule's sandbox: the Python of app.agent.inner in
    the capsule's cgroup itself (its processes are in cgroups below it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cgroups = (entry / "cgroup").read_text().splitlines()
        except OSError:
            continue
        if (
            os.path.basename(argv[0]).startswith(b"python")
            and b"app.agent.inner" in argv
            and any(CAPSULE_CGROUP.search(line) and line.endswith(f"/{capsule_id}") for line in cgroups)
        ):
            found.append(int(entry.name))
    return found


@asynccontextmanager
async def separate_agent(tmp_path: Path) -> AsyncIterator[tuple[Any, str]]:
    """`capsule agent --listen ADDR --metrics ADDR` with a log cap of CAP_BYTES; yields a stub bound
    to it and its metrics page's address."""
    address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = tmp_path / "agent.log"
    env = command_env(CAPSULE_DATA_DIR=str(tmp_path / "agent-data"), CAPSULE_OUTPUT_CAP_BYTES=str(CAP_BYTES))
    agent = subprocess.Popen(
        [str(CAPSULE), "agent", "--listen", address, "--metrics", metrics],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    channel = grpc.aio.insecure_channel(address)
    try:
        async with asyncio.timeout(DEADLINE_SEC):
            while agent.poll() is None:
                try:
                    async with asyncio.timeout(0.5):
                        await channel.channel_ready()
                    break
                except TimeoutError:
                    continue
            assert agent.poll() is None, log.read_text()
        yield agent_pb2_grpc.AgentStub(channel), f"http://{metrics}/metrics"
    finally:
        await channel.close()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(agent.wait), DEADLINE_SEC)
            except TimeoutError:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


async def test_a_separate_agents_metrics_page_counts_each_capsules_output(tmp_path: Path) -> None:
    async with separate_agent(tmp_path) as (stub, url):
        before, _ = await scrape(url)
        assert value(before, "capsule_agent_capsules") == 0
        for capsule in ("talker", "flood"):
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule))
        pids = {
            capsule: (await start_sh(stub, capsule, script)).pid
            for capsule, script in (("talker", TALKER), ("flood", FLOOD))
        }
        for capsule, pid in pids.items():
            await wait_exited(stub, capsule, pid)
        assert_counted(await counted(url, "talker", "flood"), "talker", "flood")
        # An exec's output is read from pipes too.
        await exec_sh(stub, "talker", "printf 12345")

        async def exec_counted() -> bool:
            samples, _ = await scrape(url)
            return value(samples, "capsule_agent_pipe_bytes_total", capsule="talker") == TALKED + 5

        await eventually(exec_counted, DEADLINE_SEC, "the exec's 5 bytes counted")
        if cgroup_sandbox():  # where the supervisor is found by its cgroup
            (supervisor,) = supervisors_of("talker")
            # Having served every kind of call, the supervisor has loaded no gRPC library: its
            # counters went to the agent over the link.
            maps = await asyncio.to_thread(Path(f"/proc/{supervisor}/maps").read_text)
            assert "grpc" not in maps, [line for line in maps.splitlines() if "grpc" in line]
            # A supervisor that does not answer holds up no scrape: its last counters stay.
            os.kill(supervisor, signal.SIGSTOP)
            try:
                for _ in range(3):
                    samples, took = await scrape(url)
                    assert took < 0.5, f"a scrape took {took:.2f} s with a supervisor stopped"
                    assert value(samples, "capsule_agent_pipe_bytes_total", capsule="talker") == TALKED + 5
                    await asyncio.sleep(0.4)
            finally:
                os.kill(supervisor, signal.SIGCONT)
        # GetOutputCounters answers the same numbers to whoever asks the agent.
        counters = await stub.GetOutputCounters(pb.CapsuleRef(capsule_id="flood"), timeout=5)
        assert counters.pipe_bytes == FLOODED and counters.evicted_events >= 1, counters

"""Process.usage and oomKilled through the API, on real processes: what a process costs while it
runs, its final totals kept in the store once it has exited, and an OOM kill told as such.

Usage is measured in both runtimes (a cgroup per process in the sandbox on a cgroup v1 host, /proc
sums otherwise). The OOM test needs a memory limit, that is the sandbox runtime on a host with
cgroups (this one: v1); it skips elsewhere and says so.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tests.agent.test_usage import HUNDRED_MIB, MIB, needs_cgroups
from tests.e2e.client import HttpClient, subscribe, ws_session
from tests.e2e.conftest import Server
from tests.e2e.test_operations import Samples, delta, scrape

PYTHON = sys.executable
DEADLINE_SEC = 15.0
OUTCOMES = ("zero", "non_zero", "signal", "timed_out", "oom", "restarted", "unknown")


async def process(api: HttpClient, capsule_id: str, selector: str) -> dict[str, Any]:
    found = (await api.run("Process", capsuleId=capsule_id, selector=selector)).ok()["process"]
    assert found is not None
    return dict(found)


async def until(api: HttpClient, capsule_id: str, selector: str, holds: Any, what: str) -> dict[str, Any]:
    """The process once holds(process) is true; fails after DEADLINE_SEC."""
    try:
        async with asyncio.timeout(DEADLINE_SEC):
            while not holds(found := await process(api, capsule_id, selector)):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what} did not hold within {DEADLINE_SEC} s") from None
    return found


async def test_usage_of_a_running_process_and_its_final_totals_kept_in_the_store(
    api: HttpClient, capsule_id: str
) -> None:
    started = (
        await api.run(
            "StartProcess",
            capsuleId=capsule_id,
            input={"cmd": PYTHON, "args": ["-c", HUNDRED_MIB], "stdin": True, "tag": "hog"},
        )
    ).ok()["startProcess"]
    assert started["oomKilled"] is False and started["usage"] is not None, started

    def touched(found: dict[str, Any]) -> bool:
        usage = found["usage"]
        return usage is not None and usage["memoryPeakBytes"] >= 95 * MIB and usage["cpuSec"] >= 0.25

    running = (await until(api, capsule_id, "hog", touched, "100 MiB touched and 0.3 s of CPU"))["usage"]
    assert running["processes"] == 1 and running["memoryBytes"] >= 95 * MIB, running
    (await api.run("CloseInput", capsuleId=capsule_id, selector="hog")).ok()
    ended = await until(api, capsule_id, "hog", lambda p: p["status"] == "EXITED", "the exit")
    final = ended["usage"]
    assert (ended["exitCode"], ended["oomKilled"]) == (0, False), ended
    assert final["cpuSec"] >= running["cpuSec"] and final["memoryPeakBytes"] >= 95 * MIB, final
    assert (final["memoryBytes"], final["processes"]) == (0, 0), final

    # Once the capsule is gone its host knows nothing of the process: what answers is the store's record.
    (await api.run("DestroyCapsule", id=capsule_id)).ok()
    kept = await process(api, capsule_id, "hog")
    assert (kept["status"], kept["oomKilled"], kept["usage"]) == ("EXITED", False, final), kept


@needs_cgroups
async def test_an_allocation_past_memory_mib_ends_oom_killed_and_the_capsule_answers(
    server: Server, key: str, api: HttpClient
) -> None:
    before = await scrape(server)
    capsule_id = (await api.run("CreateCapsule", limits={"memoryMiB": 64})).ok()["createCapsule"]["id"]
    code = "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"
    (
        await api.run(
            "StartProcess", capsuleId=capsule_id, input={"cmd": PYTHON, "args": ["-c", code], "tag": "big"}
        )
    ).ok()
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        async with asyncio.timeout(DEADLINE_SEC):
            events = [
                result["processOutput"]
                async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector="big")
            ]
    exited = events[-1]
    assert exited["__typename"] == "ProcessExited", events
    assert (exited["signal"], exited["exitCode"], exited["oomKilled"]) == ("SIGKILL", None, True), exited
    ended = await until(api, capsule_id, "big", lambda p: p["status"] == "EXITED", "the exit")
    assert (ended["signal"], ended["oomKilled"]) == ("SIGKILL", True), ended
    assert ended["usage"]["memoryPeakBytes"] <= 64 * MIB, ended
    # The capsule's supervisor outlived the OOM kill: it still runs commands.
    result = (await api.run("Exec", capsuleId=capsule_id, input={"cmd": "echo", "args": ["still here"]})).ok()
    assert result["exec"]["stdout"] == "still here\n"
    # What the store keeps of the exit says the same (the exit recorder wrote it).
    (await api.run("DestroyCapsule", id=capsule_id)).ok()
    kept = await process(api, capsule_id, "big")
    assert (kept["signal"], kept["oomKilled"]) == ("SIGKILL", True), kept
    # /metrics counts the exit once, as oom, and as nothing else (a SIGKILL, but not one sent).
    after = await exits_counted(server, before)
    exits = {
        outcome: delta(before, after, "capsule_processes_exited_total", outcome=outcome)
        for outcome in OUTCOMES
    }
    assert exits == {outcome: 1 if outcome == "oom" else 0 for outcome in OUTCOMES}, exits
    assert delta(before, after, "capsule_processes_started_total") == 1


async def exits_counted(server: Server, before: Samples) -> Samples:
    """/metrics once it counts an exit more than before (the exit recorder writes it; the same
    replica counts it)."""
    try:
        async with asyncio.timeout(DEADLINE_SEC):
            while True:
                after = await scrape(server)
                if sum(delta(before, after, "capsule_processes_exited_total", outcome=o) for o in OUTCOMES):
                    return after
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no exit counted on /metrics within {DEADLINE_SEC} s") from None

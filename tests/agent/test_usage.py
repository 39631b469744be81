"""What a background process costs (Process.usage) and whether the kernel's OOM killer ended it,
at the agent, on real processes.

Usage is measured in every mode: by a cgroup per process in the sandbox runtime on a cgroup v1
host, by /proc sums over the process's group otherwise (the plain runtime, the rlimit mode). An OOM
kill is told apart only where the capsule has a memory limit, that is a cgroup: those tests need the
sandbox runtime on a host with cgroups (this one: v1) and skip elsewhere, saying so.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from app import domain, wire
from app.agent import meter
from app.agent.cgroups import CgroupHost, scope_of
from app.pb import agent_pb2 as pb
from tests.agent.conftest import MakeStub
from tests.agent.helpers import eventually, exec_sh, read_output, ref, wait_exited, wait_output
from tests.system import sandboxed

MIB = 1024 * 1024
PYTHON = sys.executable
# Touches 100 MiB (every page written), burns at least 0.3 s of CPU, says so, then waits on stdin.
HUNDRED_MIB = """
import sys, time
block = bytearray(100 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("touched", flush=True)
sys.stdin.read()
"""


def cgroup_sandbox() -> bool:
    """True when the tests' agents sandbox capsules in cgroups of their own (a memory limit holds)."""
    with tempfile.TemporaryDirectory() as directory:
        return sandboxed() and CgroupHost.detect(scope_of(Path(directory))) is not None


needs_cgroups = pytest.mark.skipif(
    not cgroup_sandbox(),
    reason="an OOM kill needs a memory limit: the sandbox runtime on a host with cgroups (run as root, "
    "CAPSULE_TEST_RUNTIME unset or sandbox)",
)


async def start_python(stub: Any, capsule: str, code: str, **fields: Any) -> domain.ProcessInfo:
    request = pb.StartRequest(capsule_id=capsule, cmd=PYTHON, args=["-c", code], **fields)
    return wire.process_info(await stub.StartProcess(request))


async def get(stub: Any, capsule: str, selector: str | int) -> domain.ProcessInfo:
    return wire.process_info(await stub.GetProcess(ref(capsule, selector)))


async def test_usage_of_a_process_that_burns_cpu_and_touches_100_mib(stub: Any, capsule: str) -> None:
    started = await start_python(stub, capsule, HUNDRED_MIB, stdin=True)
    assert started.usage is not None and started.oom_killed is False
    await wait_output(stub, capsule, started.tag, b"touched")
    running = (await get(stub, capsule, started.tag)).usage
    assert running is not None, "usage is measured in every runtime"
    assert running.cpu_sec >= 0.25, running
    assert running.memory_bytes >= 95 * MIB and running.memory_peak_bytes >= 95 * MIB, running
    assert running.processes == 1, running
    await stub.CloseInput(ref(capsule, started.tag))
    ended = await wait_exited(stub, capsule, started.tag)
    assert (ended.exit_code, ended.oom_killed) == (0, False), ended
    final = ended.usage
    assert final is not None, ended
    assert final.cpu_sec >= running.cpu_sec and final.memory_peak_bytes >= 95 * MIB, final
    assert (final.memory_bytes, final.processes) == (0, 0), final


@pytest.mark.skipif(
    not sandboxed(), reason="the rlimit mode is the sandbox runtime's: it needs bwrap and root"
)
async def test_usage_in_the_rlimit_mode_is_summed_from_proc(make_stub: MakeStub) -> None:
    stub = await make_stub(runtime="sandbox", sandbox_limits="rlimit", sandbox_spares=0)
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="r1"))
    started = await start_python(stub, "r1", HUNDRED_MIB, stdin=True)
    await wait_output(stub, "r1", started.tag, b"touched")
    running = (await get(stub, "r1", started.tag)).usage
    assert running is not None and running.processes == 1, running
    assert running.cpu_sec >= 0.25 and running.memory_peak_bytes >= 95 * MIB, running
    await stub.CloseInput(ref("r1", started.tag))
    final = (await wait_exited(stub, "r1", started.tag)).usage
    assert final is not None and final.memory_peak_bytes >= 95 * MIB and final.processes == 0, final


async def test_usage_counts_the_processes_of_the_group(stub: Any, capsule: str) -> None:
    started = await start_python(
        stub,
        capsule,
        "import subprocess, sys; [subprocess.Popen(['sleep', '100']) for _ in range(3)]; "
        "print('up', flush=True); sys.stdin.read()",
        stdin=True,
    )
    await wait_output(stub, capsule, started.tag, b"up")
    usage = (await get(stub, capsule, started.tag)).usage
    assert usage is not None and usage.processes == 4, usage
    await stub.SignalProcess(pb.SignalRequest(process=ref(capsule, started.tag), signal=9))
    ended = await wait_exited(stub, capsule, started.tag)
    # A SIGKILL someone sent is no OOM kill.
    assert (ended.signal, ended.oom_killed) == (signal.SIGKILL, False), ended
    assert ended.usage is not None and ended.usage.processes == 0, ended.usage


@needs_cgroups
async def test_an_allocation_past_the_memory_limit_ends_oom_killed_and_the_capsule_answers(
    make_stub: MakeStub,
) -> None:
    stub = await make_stub()
    limits = pb.CapsuleLimits(max_processes=64, memory_mib=64)
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="small", limits=limits))
    hog = await start_python(stub, "small", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])")
    ended = await wait_exited(stub, "small", hog.tag, within=30)
    assert (ended.signal, ended.exit_code, ended.oom_killed) == (signal.SIGKILL, None, True), ended
    assert ended.usage is not None and ended.usage.memory_peak_bytes <= 64 * MIB, ended.usage
    exits = [e for e in await read_output(stub, "small", hog.tag) if isinstance(e, domain.ProcessExit)]
    assert [(e.signal, e.oom_killed) for e in exits] == [(signal.SIGKILL, True)]
    # The supervisor survived the OOM: the capsule still runs commands.
    assert (await exec_sh(stub, "small", "echo still here")).stdout == b"still here\n"
    listed = wire.process_info(await stub.GetProcess(ref("small", hog.tag)))
    assert listed.oom_killed is True


@needs_cgroups
async def test_a_run_the_oom_killer_ended_is_restarted_and_says_so(make_stub: MakeStub) -> None:
    stub = await make_stub()
    limits = pb.CapsuleLimits(max_processes=64, memory_mib=64)
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="small", limits=limits))
    restart = pb.RestartPolicy(
        policy=pb.RestartPolicy.ON_FAILURE, max_restarts=1, backoff_sec=0.01, max_backoff_sec=0.01
    )
    hog = await start_python(
        stub, "small", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])", restart=restart
    )
    events = await read_output(stub, "small", hog.tag, within=30)
    ends = [e for e in events if isinstance(e, domain.ProcessRestarted | domain.ProcessExit)]
    assert [(type(e).__name__, e.signal, e.oom_killed) for e in ends] == [
        ("ProcessRestarted", signal.SIGKILL, True),
        ("ProcessExit", signal.SIGKILL, True),
    ]
    ended = await wait_exited(stub, "small", hog.tag)
    assert (ended.restarts, ended.oom_killed) == (1, True), ended


async def test_the_peak_of_a_small_process_is_its_own_not_the_supervisors(stub: Any, capsule: str) -> None:
    # wait4's ru_maxrss would say the supervisor's size at the fork (tens of MiB): it is not used.
    started = await start_python(stub, capsule, "import time; time.sleep(0.3)")
    ended = await wait_exited(stub, capsule, started.tag)
    assert ended.usage is not None and 0 < ended.usage.memory_peak_bytes < 20 * MIB, ended.usage


class TestProcMeters:
    """The /proc meter's own rules, on real processes."""

    async def test_a_start_is_read_from_its_leader_alone_and_every_later_ask_from_a_scan(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        scans: list[int] = []
        real_scan = meter._scan

        def counted(proc: Path = Path("/proc")) -> dict[int, Any]:
            scans.append(1)
            return real_scan(proc)

        monkeypatch.setattr(meter, "_scan", counted)
        meters = meter.ProcMeters()
        child = await asyncio.create_subprocess_exec(
            "sh", "-c", "sleep 30 & sleep 30", start_new_session=True
        )
        try:
            run = meter.ProcMeter(meters, child.pid)

            # Just after its exec a leader may have no page resident yet, and the kernel's resident
            # count is read from per-CPU counters that fold in late (a start's answer then says 0
            # bytes): ask until its own stat says it has one, so that the leader's figures are read.
            def at_start_resident() -> Any:
                usage = run.usage(at_start=True)
                return usage if usage is not None and usage.memory_bytes > 0 else None

            at_start = await eventually(at_start_resident, what="the shell's first page, as its stat says")
            # Every start answers with its usage: no scan of all of /proc for it.
            assert scans == []
            assert at_start.processes == 1 and at_start.memory_bytes > 0

            async def whole_group() -> bool:
                usage = run.usage()
                return usage is not None and usage.processes == 3  # sh and its two sleeps

            # An ask, however soon after the start, counts the whole group.
            await eventually(whole_group, within=10, what="a scan to count the run's whole group")
            assert scans
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            await child.wait()

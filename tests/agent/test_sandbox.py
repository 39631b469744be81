"""The sandbox runtime at the agent: sandboxes started ahead become capsules of their own, and an agent
killed outright takes its sandboxes with it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from app.agent.cgroups import CgroupHost, RlimitHost, UidGroup, scope_of
from app.agent.sandbox import UID_BASE, UID_COUNT, SandboxRuntime
from app.agent.uids import UidRegistry
from app.domain import CapsuleSpec
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.conftest import MakeStub, agent_settings, workspace_on_host
from tests.agent.helpers import echoed_pid, eventually, exec_sh, read_output, start_sh
from tests.system import capsule_alive, free_port, ready_spares

CGROUPS = Path("/sys/fs/cgroup/pids/capsule")


def cgroup_pids(data_dir: Path, capsule_id: str) -> list[int]:
    """The processes in the pids cgroup of a capsule of the agent on data_dir."""
    procs = CGROUPS / scope_of(data_dir / "agent") / capsule_id / "cgroup.procs"
    return [int(line) for line in procs.read_text().split()] if procs.exists() else []


async def test_capsules_made_one_after_another_are_each_their_own(
    make_stub: MakeStub, tmp_path: Path
) -> None:
    stub = await make_stub(runtime="sandbox")
    ids = [f"cap-{n}" for n in range(4)]
    infos = [await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule_id)) for capsule_id in ids]
    assert all(info.runtime == pb.RUNTIME_SANDBOX for info in infos)
    owners = {workspace_on_host(tmp_path, capsule_id).stat().st_uid for capsule_id in ids}
    assert len(owners) == len(ids)  # a host uid each, however the sandbox was started
    for capsule_id in ids:
        info = await start_sh(stub, capsule_id, "echo $$ > me; sleep 1000", tag="sleeper")

        async def written(capsule_id: str = capsule_id) -> bytes:  # the shell runs on after its start
            reply = await stub.Exec(pb.ExecRequest(capsule_id=capsule_id, cmd="cat", args=["me"]))
            return bytes(reply.stdout) if reply.stdout.endswith(b"\n") else b""

        pid = await eventually(written, what=f"the shell of {capsule_id} to write its pid")
        assert int(pid) == info.pid and info.capsule_id == capsule_id
        assert capsule_alive(capsule_id, info.pid, sandbox=True) and cgroup_pids(tmp_path, capsule_id)
    listed = await stub.ListCapsules(pb.Empty())
    assert [c.capsule_id for c in listed.capsules] == ids
    assert all(c.running_processes == 1 for c in listed.capsules)


async def test_an_agent_killed_outright_takes_its_sandboxes_with_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = os.environ | {"CAPSULE_DATA_DIR": str(tmp_path), "CAPSULE_RUNTIME": "sandbox"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", "agent", "--listen", address], env=env, start_new_session=True
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = agent_pb2_grpc.AgentStub(channel)
            await asyncio.wait_for(channel.channel_ready(), 30)
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="doomed"))
            info = await start_sh(stub, "doomed", "setsid sleep 1000 & echo $!; sleep 1000")
            escaped = await echoed_pid(stub, "doomed", info.pid)
        assert capsule_alive("doomed", escaped, sandbox=True)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        await eventually(lambda: not cgroup_pids(tmp_path, "doomed"), what="the sandbox's end with its agent")
        # The kernel ends the rest of the sandbox's PID namespace with it, in the cgroups of their
        # runs below the capsule's: a moment later.
        await eventually(
            lambda: (
                not capsule_alive("doomed", info.pid, sandbox=True)
                and not capsule_alive("doomed", escaped, sandbox=True)
            ),
            what="the capsule's processes to end with their sandbox",
        )
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


@pytest.fixture
def host_uid() -> Iterator[int]:
    """A capsule uid held in the host-wide registry, as an agent would take it: agents of tests that
    run at the same time never get it."""
    registry = UidRegistry(UID_BASE, UID_COUNT - 1)
    try:
        yield registry.take()
    finally:
        registry.close()


async def test_a_sandbox_ends_once_its_lifeline_is_cut(tmp_path: Path, host_uid: int) -> None:
    # A sandbox launched in the instant its agent died has no parent left for --die-with-parent to
    # watch: the lifeline alone must end it. Here the launcher's parent (this test) lives on.
    runtime, problem = await SandboxRuntime.probe(agent_settings(tmp_path))
    assert runtime is not None, problem
    read, write = os.pipe()
    runtime = dataclasses.replace(runtime, lifeline=read)
    events: list[Any] = []
    sandbox = await runtime.launch(
        capsule_id="cut",
        capsule_dir=tmp_path / "cut",
        uid=host_uid,
        spec=CapsuleSpec(),
        publish=events.append,
    )
    try:
        assert cgroup_pids(tmp_path, "cut")
        os.close(write)
        await eventually(lambda: sandbox.process.returncode is not None, what="the sandbox's end")
        await eventually(lambda: not cgroup_pids(tmp_path, "cut"), what="its cgroup emptied")
    finally:
        os.close(read)
        await sandbox.stop()


def started_from(directory: Path) -> list[int]:
    """PIDs of the host's processes whose command line names directory (launcher, bwrap, supervisor)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(directory).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return found


async def test_a_launch_cancelled_at_any_point_leaves_no_process(tmp_path: Path, host_uid: int) -> None:
    # An agent that stops while a spare starts cancels that launch wherever it is: before the
    # launcher is forked, once it is (bwrap starting), or while the supervisor comes up.
    runtime, problem = await SandboxRuntime.probe(agent_settings(tmp_path))
    assert runtime is not None, problem
    points: dict[str, Callable[[Path], bool]] = {
        "at once": lambda directory: True,
        "launcher forked": lambda directory: bool(started_from(directory)),
        "bwrap running": lambda directory: len(started_from(directory)) >= 2,
        "socket bound": lambda directory: (directory / "run" / "agent.sock").exists(),
    }
    for n, (point, reached) in enumerate(points.items()):
        await _cancel_launch(runtime, tmp_path / f"launch-{n}", host_uid, reached, point)


async def _cancel_launch(
    runtime: SandboxRuntime, directory: Path, uid: int, reached: Callable[[Path], bool], point: str
) -> None:
    launch = asyncio.create_task(
        runtime.launch(
            capsule_id=directory.name,
            capsule_dir=directory,
            uid=uid,
            spec=CapsuleSpec(),
            publish=lambda event: None,
        )
    )
    await eventually(lambda: reached(directory) or launch.done(), within=30, what=point)
    launch.cancel()
    done = (await asyncio.gather(launch, return_exceptions=True))[0]
    if not isinstance(done, BaseException):  # it was up before the cancel reached it
        await done.stop()
    await eventually(lambda: not started_from(directory), what=f"nothing left of a launch cancelled {point}")
    await eventually(lambda: not uid_processes(uid), what=f"no process of its uid ({point})")


async def test_spare_sandboxes_are_kept_ready_ahead(make_stub: MakeStub, tmp_path: Path) -> None:
    stub = await make_stub(runtime="sandbox", sandbox_spares=2)
    await eventually(lambda: ready_spares(tmp_path) == 2, within=30, what="two spares ready")
    for capsule_id in ("first", "second"):
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule_id))
    await eventually(lambda: ready_spares(tmp_path) == 2, within=30, what="the spares made again")
    owners = {workspace_on_host(tmp_path, c).stat().st_uid for c in ("first", "second")}
    assert len(owners) == 2


def uid_processes(uid: int) -> list[int]:
    return UidGroup(RlimitHost(), uid).pids()


async def test_without_cgroups_rlimits_bound_a_capsule_and_its_uid_ends_it(
    make_stub: MakeStub, tmp_path: Path
) -> None:
    stub = await make_stub(runtime="sandbox", sandbox_limits="rlimit", sandbox_spares=1)
    limits = pb.CapsuleLimits(max_processes=20)
    # The first takes the spare (started with the default limit), the second a sandbox of its own.
    for capsule_id in ("bomb", "calm"):
        info = await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule_id, limits=limits))
        assert info.runtime == pb.RUNTIME_SANDBOX and not info.HasField("usage")
    for capsule_id in ("bomb", "calm"):
        # dash gives up at the first refused fork; forks counts those that were not refused.
        script = "n=0; while :; do sleep 1000 & n=$((n+1)); echo $n > forks; done"
        await exec_sh(stub, capsule_id, script, timeout_sec=20)
        reply = await stub.Exec(pb.ExecRequest(capsule_id=capsule_id, cmd="cat", args=["forks"]))
        assert 0 < int(reply.stdout) < 20
    uid = workspace_on_host(tmp_path, "bomb").stat().st_uid
    assert uid_processes(uid)
    await stub.DestroyCapsule(pb.CapsuleRef(capsule_id="bomb"))
    assert not uid_processes(uid)
    reply = await stub.Exec(pb.ExecRequest(capsule_id="calm", cmd="true"))
    assert reply.exit_code == 0


async def test_an_agent_clears_what_a_killed_agent_on_its_directory_left_of_cgroups(tmp_path: Path) -> None:
    host = CgroupHost.detect(scope_of(tmp_path / "agent"))
    assert host is not None
    host.prepare()
    # A spare's, empty (its sandbox ended with its agent), and a capsule's that still holds a process.
    left, busy = host.capsule("spare-0123456789ab", 0), host.capsule("held", 0)
    left.create(CapsuleSpec().limits)
    busy.create(CapsuleSpec().limits)
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        for procs in busy.procs_files:
            procs.write_text(str(sleeper.pid))
        other = CgroupHost.detect(scope_of(tmp_path / "elsewhere"))
        assert other is not None and other.clear() == 0  # another agent's part holds none of them
        assert host.clear() == 2
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert not any(path.exists() for path in (*left.paths, *busy.paths))
    finally:
        sleeper.kill()
        sleeper.wait()
        busy.kill()
        busy.remove()
        left.remove()


NOISE = """
import socket, struct
frames = [
    b"\\xff" * 4096,
    struct.pack("!IBIB", 2**31, 1, 1, 0),
    struct.pack("!IBIB", 3, 99, 1, 0) + b"abc",
    struct.pack("!IBIB", 8, 1, 1, 200) + b"\\0" * 8,
]
held = []
for data in frames * 10:
    s = socket.socket(socket.AF_UNIX)
    s.connect("/run/capsule/agent.sock")
    s.sendall(data)
    held.append(s)
print("sent", len(held))
"""


async def test_what_a_capsule_writes_to_its_supervisors_socket_leaves_it_serving(
    make_stub: MakeStub,
) -> None:
    stub = await make_stub(runtime="sandbox")
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="noisy"))
    sent = await stub.Exec(pb.ExecRequest(capsule_id="noisy", cmd=sys.executable, args=["-c", NOISE]))
    assert (sent.exit_code, sent.stdout) == (0, b"sent 40\n"), sent.stderr
    assert (await exec_sh(stub, "noisy", "echo serving")).stdout == b"serving\n"
    info = await start_sh(stub, "noisy", "echo started")
    events = await read_output(stub, "noisy", info.pid)
    assert b"".join(getattr(e, "data", b"") for e in events) == b"started\n"

"""An agent killed outright leaves its processes running; the next agent on the same data ends them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from app.agent.capsules import Capsules
from app.agent.events import ProcessEvents
from app.agent.leftovers import COMPACT_LINES, Sessions, boot_ticks, session_members
from app.agent.server import start_agent
from app.datadir import DirectoryInUse, DirectoryLock, lock_agent_dir
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.conftest import MakeStub, agent_settings
from tests.agent.helpers import eventually, start_sh, wait_output
from tests.system import free_port, is_alive, process_alive


async def test_next_agent_kills_what_a_killed_agent_left(tmp_path: Path, make_stub: MakeStub) -> None:
    # The plain runtime's own concern: a sandbox ends with its agent (--die-with-parent).
    address = f"127.0.0.1:{free_port()}"
    env = os.environ | {"CAPSULE_DATA_DIR": str(tmp_path), "CAPSULE_RUNTIME": "plain"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", "agent", "--listen", address], env=env, start_new_session=True
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            await channel.channel_ready()
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
            await start_sh(stub, "c1", "sleep 1000 & echo child $!; sleep 1000", tag="family")
            await wait_output(stub, "c1", "family", b"child ")
            listed = await stub.ListProcesses(pb.CapsuleRef(capsule_id="c1"))
            leader = listed.processes[0].pid
            family = session_members(leader)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        assert len(family) >= 2 and all(is_alive(pid) for pid in family), "killed outright, it leaves them"

        stub = await make_stub(runtime="plain")  # a new agent on the same data directory
        info = await stub.GetCapsule(pb.CapsuleRef(capsule_id="c1"))
        assert info.running_processes == 0
        await eventually(lambda: not any(is_alive(pid) for pid in family), what="leftovers killed")
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


async def test_an_agent_on_a_directory_in_use_kills_nothing(tmp_path: Path, make_stub: MakeStub) -> None:
    stub = await make_stub()
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
    info = await start_sh(stub, "c1", "sleep 1000")
    with pytest.raises(DirectoryInUse) as refused:
        await start_agent("127.0.0.1:0", agent_settings(tmp_path))
    assert refused.value.pid == os.getpid()
    assert process_alive(info)
    assert (await stub.GetCapsule(pb.CapsuleRef(capsule_id="c1"))).running_processes == 1


def test_loading_capsules_needs_the_directory_lock(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    capsules = Capsules(settings, ProcessEvents(), None)
    with pytest.raises(RuntimeError, match="lock"):
        capsules.load(DirectoryLock.acquire(tmp_path / "elsewhere", what="agent directory", holder="a test"))
    released = lock_agent_dir(settings)
    released.release()
    with pytest.raises(RuntimeError, match="lock"):
        capsules.load(released)


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _sleeps(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "1000"], start_new_session=True) for _ in range(count)]


def test_a_leader_started_within_the_ticks_its_session_records(tmp_path: Path) -> None:
    journal = tmp_path / "sessions"
    sessions = Sessions(journal)
    started = []
    for _ in range(50):
        spawned_after = boot_ticks()
        true = subprocess.Popen(["sleep", "0"], start_new_session=True)
        sessions.add(true.pid, spawned_after)
        started.append((true.pid, _start_time(true.pid)))
        true.wait()
    lines = (line.removeprefix("+").split() for line in journal.read_text().splitlines())
    recorded = {int(pid): (int(first), int(last)) for pid, first, last in lines}
    for pid, start in started:
        first, last = recorded[pid]
        assert first <= start <= last


def test_a_pid_now_of_a_process_started_later_is_left_alone(tmp_path: Path) -> None:
    (stranger,) = _sleeps(1)
    try:
        journal = tmp_path / "sessions"
        start = _start_time(stranger.pid)
        journal.write_text(f"+{stranger.pid} {start - 30} {start - 1}\n")
        assert Sessions(journal).sweep() == 0
        assert is_alive(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


def test_the_journal_stays_small_and_true(tmp_path: Path) -> None:
    kept, ended, churned = sleeps = _sleeps(3)
    try:
        journal = tmp_path / "sessions"
        sessions = Sessions(journal)
        spawned_after = boot_ticks() - 1000  # a while before the sleeps began
        sessions.add(kept.pid, spawned_after)
        sessions.add(ended.pid, spawned_after)
        for _ in range(1000):  # a capsule that spawns and reaps all day
            sessions.add(churned.pid, spawned_after)
            sessions.remove(churned.pid)
        sessions.remove(ended.pid)
        assert len(journal.read_text().splitlines()) <= COMPACT_LINES + 2 * 3  # three live at most
        assert Sessions(journal).sweep() == 1
        assert kept.wait(timeout=10) == -signal.SIGKILL
        assert is_alive(ended.pid) and is_alive(churned.pid)
        assert journal.read_text() == ""
    finally:
        for sleep in sleeps:
            sleep.kill()
            sleep.wait()


def test_the_journal_reads_old_lines_and_skips_a_cut_one(tmp_path: Path) -> None:
    old, cut = sleeps = _sleeps(2)
    try:
        journal = tmp_path / "sessions"
        # Agents of earlier versions wrote "pid start" and "+pid start"; one killed mid-append left
        # a partial line.
        journal.write_text(f"{old.pid} {_start_time(old.pid)}\n+{cut.pid}")
        assert Sessions(journal).sweep() == 1
        assert old.wait(timeout=10) == -signal.SIGKILL
        assert is_alive(cut.pid)
    finally:
        for sleep in sleeps:
            sleep.kill()
            sleep.wait()

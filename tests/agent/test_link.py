"""The link between the agent and a sandbox's supervisor (app.agent.link), on a real Unix socket:
what the gRPC channel did, it does, and what comes in on the socket never takes the supervisor down."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from app import domain, wire
from app.agent import link, tally
from app.agent.server import AgentHandle, start_agent
from app.agent.service import AgentServicer
from app.agent.supervisor_link import SupervisorLink
from app.pb import agent_pb2 as pb
from tests.agent.conftest import agent_settings
from tests.agent.helpers import chunks, eventually, exec_sh, grpc_error, read_output, ref, start_sh

CAPSULE = "c1"


def short_path(directory: Path, name: str) -> tuple[str, int]:
    """A path to name in directory short enough for a socket, through a descriptor of directory."""
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{name}", fd


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentHandle]:
    handle = await start_agent(None, agent_settings(tmp_path / "data", runtime="plain"))
    yield handle
    await handle.stop()


@pytest.fixture
async def served(tmp_path: Path, agent: AgentHandle) -> AsyncIterator[str]:
    """The agent's servicer on the link's socket: the path a link connects to."""
    path, fd = short_path(tmp_path, "agent.sock")
    server = await link.serve(tmp_path / "agent.sock", agent.servicer)
    yield path
    server.close()
    os.close(fd)


@pytest.fixture
async def supervisor(served: str) -> AsyncIterator[SupervisorLink]:
    opened = SupervisorLink(served)
    await opened.open()
    await opened.stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=CAPSULE))
    yield opened
    await opened.close()


def running(marker: str) -> list[int]:
    """The pids of processes whose command line holds marker."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if marker.encode() in file.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


async def test_unary_calls_answer_and_keep_their_errors_status(supervisor: SupervisorLink) -> None:
    stub = supervisor.stub
    result = await exec_sh(stub, CAPSULE, "echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
    error = await grpc_error(stub.GetCapsule(pb.CapsuleRef(capsule_id="nobody")))
    assert error.code() is grpc.StatusCode.NOT_FOUND and "nobody" in (error.details() or "")
    error = await grpc_error(stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="../up")))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Many at once on the one connection, each with its own answer.
    results = await asyncio.gather(*(exec_sh(stub, CAPSULE, f"echo {n}") for n in range(20)))
    assert [r.stdout for r in results] == [f"{n}\n".encode() for n in range(20)]


async def test_a_stream_brings_every_message_then_ends(supervisor: SupervisorLink) -> None:
    stub = supervisor.stub
    watch = stub.WatchProcesses(pb.CapsuleRef(capsule_id=CAPSULE))
    await watch.initial_metadata()
    info = await start_sh(stub, CAPSULE, "seq 1 20000")
    events = await read_output(stub, CAPSULE, info.pid)
    data = b"".join(e.data for e in events if hasattr(e, "data"))
    assert data == b"".join(f"{n}\n".encode() for n in range(1, 20001))
    kinds = []
    async with asyncio.timeout(10):
        async for message in watch:
            kinds.append(wire.process_event(message).kind.name)
            if kinds[-1] == "EXITED":
                break
    assert kinds == ["STARTED", "EXITED"]
    assert watch.cancel()
    error = await grpc_error(read_output(stub, CAPSULE, "nobody"))
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_output_the_supervisor_sends_serialized_arrives_as_written(tmp_path: Path) -> None:
    """A capsule's supervisor yields StreamOutput's batches as bytes, joined by hand: the agent's
    end reads the same events, the batches of a flood (a megabyte each) among them."""
    settings = agent_settings(tmp_path / "data", runtime="plain", output_cap_bytes=16 * 1024 * 1024)
    agent = await start_agent(None, settings)  # its log holds the whole flood: no gap
    servicer = AgentServicer(agent._capsules, agent._events, serialized_output=True)
    path, fd = short_path(tmp_path, "serialized.sock")
    server = await link.serve(tmp_path / "serialized.sock", servicer)
    opened = SupervisorLink(path)
    try:
        await opened.open()
        stub = opened.stub
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=CAPSULE))
        script = "head -c 6000000 /dev/zero | tr '\\0' x; echo; echo err >&2; exit 4"
        info = await start_sh(stub, CAPSULE, script)
        events = await read_output(stub, CAPSULE, info.pid, within=30)
    finally:
        await opened.close()
        server.close()
        os.close(fd)
        await agent.stop()
    assert b"".join(c.data for c in chunks(events, domain.Stream.STDOUT)) == b"x" * 6_000_000 + b"\n"
    assert b"".join(c.data for c in chunks(events, domain.Stream.STDERR)) == b"err\n"
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    # The batches were big enough to be written apart from their headers.
    assert len(chunks(events)) < 6_000_000 // link.SEPARATE_BODY_BYTES
    end = events[-1]
    assert isinstance(end, domain.ProcessExit) and end.exit_code == 4


async def test_a_deadline_ends_the_call_on_both_ends(supervisor: SupervisorLink) -> None:
    marker = "31.4159"
    request = pb.ExecRequest(capsule_id=CAPSULE, cmd="sleep", args=[marker])
    error = await grpc_error(supervisor.stub.Exec(request, timeout=0.3))
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The handler was cancelled: the exec leaves nothing running.
    await eventually(lambda: not running(f"sleep\0{marker}"), what="the exec's process to be killed")
    assert (await exec_sh(supervisor.stub, CAPSULE, "echo still")).stdout == b"still\n"


async def test_a_caller_that_gives_up_cancels_the_call(supervisor: SupervisorLink) -> None:
    marker = "27.1828"
    request = pb.ExecRequest(capsule_id=CAPSULE, cmd="sleep", args=[marker])
    call = asyncio.ensure_future(supervisor.stub.Exec(request, timeout=30))
    await eventually(lambda: running(f"sleep\0{marker}"), what="the exec to start")
    call.cancel()
    await eventually(lambda: not running(f"sleep\0{marker}"), what="the exec's process to be killed")


async def test_a_reader_that_goes_ends_the_stream_in_the_supervisor(supervisor: SupervisorLink) -> None:
    stub = supervisor.stub
    info = await start_sh(stub, CAPSULE, "echo ready; sleep 30", tag="long")
    before = tally.TALLY.streams_open
    call = stub.StreamOutput(pb.OutputRequest(process=ref(CAPSULE, info.pid), from_seq=0))
    async with asyncio.timeout(10):
        await anext(aiter(call))
    assert tally.TALLY.streams_open == before + 1
    call.cancel()
    await eventually(lambda: tally.TALLY.streams_open == before, what="the handler to end")
    with pytest.raises(grpc.aio.AioRpcError) as cancelled:
        await anext(aiter(call))
    assert cancelled.value.code() is grpc.StatusCode.CANCELLED


async def test_a_stream_nobody_reads_holds_back_no_other_call(supervisor: SupervisorLink) -> None:
    stub = supervisor.stub
    info = await start_sh(stub, CAPSULE, "head -c 50000000 /dev/zero")
    call = stub.StreamOutput(pb.OutputRequest(process=ref(CAPSULE, info.pid), from_seq=0))
    await call.initial_metadata()  # then never read again
    for _ in range(5):
        async with asyncio.timeout(10):
            assert (await exec_sh(stub, CAPSULE, "echo free")).stdout == b"free\n"
    call.cancel()


async def test_a_reply_over_the_limit_fails_its_call_alone(
    supervisor: SupervisorLink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "MAX_BODY_BYTES", 4096)
    request = pb.ExecRequest(capsule_id=CAPSULE, cmd="head", args=["-c", "10000", "/dev/zero"])
    error = await grpc_error(supervisor.stub.Exec(request, timeout=10))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await exec_sh(supervisor.stub, CAPSULE, "echo small")).stdout == b"small\n"


async def test_a_closed_link_is_unavailable(supervisor: SupervisorLink) -> None:
    await supervisor.close()
    error = await grpc_error(supervisor.stub.ListCapsules(pb.Empty()))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    error = await grpc_error(read_output(supervisor.stub, CAPSULE, "1"))
    assert error.code() is grpc.StatusCode.UNAVAILABLE


SUPERVISOR = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from app.agent import link
    from app.agent.server import start_agent
    from tests.agent.conftest import agent_settings

    async def main():
        handle = await start_agent(None, agent_settings(Path(sys.argv[1]), runtime="plain"))
        await link.serve(Path(sys.argv[2]), handle.servicer)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_supervisor_killed_mid_call_is_unavailable(tmp_path: Path) -> None:
    # Killed outright, a plain-runtime supervisor leaves its processes running: the test ends them.
    marker, background = "30.577", "30.611"
    path, fd = short_path(tmp_path, "agent.sock")
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path / "data"), str(tmp_path / "agent.sock")],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30) == b"ready\n"
        supervisor = SupervisorLink(path)
        await supervisor.open()
        stub = supervisor.stub
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=CAPSULE))
        info = await start_sh(stub, CAPSULE, "echo begun; exec sleep 30.611")
        stream = aiter(stub.StreamOutput(pb.OutputRequest(process=ref(CAPSULE, info.pid), from_seq=0)))
        async with asyncio.timeout(10):
            await anext(stream)
        request = pb.ExecRequest(capsule_id=CAPSULE, cmd="sleep", args=[marker])
        pending = asyncio.ensure_future(stub.Exec(request))
        await eventually(lambda: running(f"sleep\0{marker}"), what="the exec to start")
        os.killpg(process.pid, signal.SIGKILL)
        for call in (pending, stub.ListCapsules(pb.Empty())):
            error = await grpc_error(call)
            assert error.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
        assert lost.value.code() is grpc.StatusCode.UNAVAILABLE
        await supervisor.close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        os.close(fd)
        for pid in running(f"sleep\0{marker}") + running(f"sleep\0{background}"):
            os.kill(pid, signal.SIGKILL)


async def raw_exchange(path: str, data: bytes, *, answered: bool = False) -> bytes:
    """What the supervisor answers to data written on a connection of its own: one frame if
    answered, else everything until it closes the connection (this end having said all it says)."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    try:
        async with asyncio.timeout(5):
            if answered:
                header = await reader.readexactly(link.HEADER.size)
                return header + await reader.readexactly(link.HEADER.unpack(header)[0])
            writer.write_eof()
            return await reader.read()
    finally:
        writer.close()


def call_frame(index: int, body: bytes, call_id: int = 7) -> bytes:
    return link.frame(link.CALL, call_id, index, link.DEADLINE.pack(5.0) + body)


async def test_what_makes_no_sense_closes_its_connection_alone(
    served: str, supervisor: SupervisorLink
) -> None:
    garbage: list[bytes] = [
        b"\xff" * 4096,
        link.HEADER.pack(2**31, link.CALL, 1, 0),  # longer than any frame may be
        link.HEADER.pack(3, 99, 1, 0) + b"abc",  # no such kind
        link.frame(link.REPLY, 1),  # a reply sent to the supervisor
        call_frame(0, b"")[:-2],  # cut short
        call_frame(0, b"") * 2,  # the same call id twice
    ]
    for data in garbage:
        assert await raw_exchange(served, data) == b""  # closed, with nothing said
    # A call it can read but not serve is answered with a status.
    for index, body, code in (
        (200, b"", grpc.StatusCode.UNIMPLEMENTED),
        (link.BY_NAME["GetCapsule"].index, b"\xff\xff\xff", grpc.StatusCode.INTERNAL),
    ):
        answer = await raw_exchange(served, call_frame(index, body), answered=True)
        assert link.HEADER.unpack_from(answer)[1:] == (link.ERROR, 7, code.value[0])
    # Through it all, the supervisor served its link.
    assert (await exec_sh(supervisor.stub, CAPSULE, "echo alive")).stdout == b"alive\n"
    listed: Any = await supervisor.stub.ListCapsules(pb.Empty())
    assert [c.capsule_id for c in listed.capsules] == [CAPSULE]

"""Small calls the agent tests share: start a shell script, read its output, wait on a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from app import domain, wire
from app.pb import agent_pb2 as pb


def ref(capsule: str, selector: str | int) -> Any:
    """A ProcessRef."""
    return wire.process_ref(capsule, str(selector))


async def start_sh(stub: Any, capsule: str, script: str, **fields: Any) -> domain.ProcessInfo:
    """Starts `sh -c script` in the background."""
    request = pb.StartRequest(capsule_id=capsule, cmd="sh", args=["-c", script], **fields)
    return wire.process_info(await stub.StartProcess(request))


async def exec_sh(stub: Any, capsule: str, script: str, **fields: Any) -> domain.ExecResult:
    """Runs `sh -c script` to completion."""
    request = pb.ExecRequest(capsule_id=capsule, cmd="sh", args=["-c", script], **fields)
    return wire.exec_result(await stub.Exec(request, timeout=30))


async def read_output(
    stub: Any, capsule: str, selector: str | int, from_seq: int = 0, within: float = 10.0
) -> list[domain.OutputEvent]:
    """Every event StreamOutput sends, until it ends."""
    events: list[domain.OutputEvent] = []
    request = pb.OutputRequest(process=ref(capsule, selector), from_seq=from_seq)
    try:
        async with asyncio.timeout(within):
            async for batch in stub.StreamOutput(request):
                events.extend(wire.output_events(batch))
    except TimeoutError:
        raise AssertionError(f"the output of {selector} did not end within {within:g} s: {events}") from None
    return events


def chunks(
    events: Sequence[domain.OutputEvent], stream: domain.Stream | None = None
) -> list[domain.OutputChunk]:
    """The output chunks among events, of one stream or of both."""
    return [e for e in events if isinstance(e, domain.OutputChunk) and stream in (None, e.stream)]


def joined(events: Sequence[domain.OutputEvent], stream: domain.Stream = domain.Stream.STDOUT) -> bytes:
    """The bytes of one stream."""
    return b"".join(chunk.data for chunk in chunks(events, stream))


async def eventually(condition: Callable[[], Any], within: float = 10.0, what: str = "condition") -> Any:
    """Polls a sync or async condition until it is truthy; returns its value."""
    try:
        async with asyncio.timeout(within):
            while True:
                value = condition()
                if asyncio.iscoroutine(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what} did not hold within {within} s")


async def wait_exited(
    stub: Any, capsule: str, selector: str | int, within: float = 10.0
) -> domain.ProcessInfo:
    """The process's info once it has exited."""

    async def exited() -> domain.ProcessInfo | None:
        info = wire.process_info(await stub.GetProcess(ref(capsule, selector)))
        return info if info.status is domain.ProcessStatus.EXITED else None

    result: domain.ProcessInfo = await eventually(exited, within, f"exit of {selector}")
    return result


async def wait_output(stub: Any, capsule: str, selector: str | int, needle: bytes) -> None:
    """Returns once the process's stdout contains needle."""
    request = pb.OutputRequest(process=ref(capsule, selector), from_seq=0)
    seen = b""
    async with asyncio.timeout(10):
        async for batch in stub.StreamOutput(request):
            seen += joined(wire.output_events(batch))
            if needle in seen:
                return
    pytest.fail(f"{needle!r} never appeared in the output of {selector}")


async def echoed_pid(stub: Any, capsule: str, selector: str | int) -> int:
    """The first line of a process's output, read as the PID its script echoed."""
    request = pb.OutputRequest(process=ref(capsule, selector), from_seq=0)
    seen = b""
    async with asyncio.timeout(10):
        async for batch in stub.StreamOutput(request):
            seen += joined(wire.output_events(batch))
            if b"\n" in seen:
                return int(seen.split(b"\n", 1)[0])
    raise AssertionError("no PID was echoed")


async def grpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The error a call fails with; fails the test if it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error: grpc.aio.AioRpcError = caught.value
    return error

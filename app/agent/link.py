"""The link between the agent and a sandbox's supervisor: the Agent service's calls as frames on the
supervisor's Unix socket.

Both ends are this codebase, on one machine. Through gRPC, each call crossed HTTP/2 framing and
gRPC's C-core threads on both sides, a thread hop each way in the agent and in the supervisor:
about half of what a sandboxed exec cost beyond a plain one (some 1 ms of 2.2 to 2.5). Here a call
is one frame each way, written and read on the event loop.

A frame is a header (the body's length, the frame's kind, the call's id, a code) and a body:
- CALL: code, the method's index in the service; body, the deadline in seconds (a double, negative
  for none) then the serialized request.
- CANCEL: the caller gave up; the handler is cancelled.
- HEADERS: a streaming handler has begun (what gRPC's initial metadata tells).
- REPLY: a unary call's reply, or one message of a stream (a handler may yield a message serialized
  already, as the supervisor's StreamOutput does; a body of SEPARATE_BODY_BYTES or more is written
  after its header, not copied to join it).
- END: a stream ended.
- ERROR: code, a gRPC status code; body, its details (UTF-8).

Unary calls share one connection, each with an id of its own. Each server-streaming call has a
connection of its own, so a reader that falls behind holds back its own stream alone (the socket's
buffer is its window), and a cancel is the connection's close. Errors keep gRPC's shape: the
servicer raises a CallError of a gRPC status, and the agent's end (app.agent.supervisor_link) raises
the AioRpcError a channel would raise.

This module is the protocol and the supervisor's end, and needs no grpc: a supervisor, one per
capsule, loads neither gRPC's library nor its threads.

The capsule's own processes can reach the socket, as they could reach the gRPC one: whatever they
write is read with the same checks, and a frame that makes no sense closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from app.errors import Status
from app.pb import agent_pb2 as pb

logger = logging.getLogger(__name__)

HEADER = struct.Struct("!IBIB")  # body length, kind, call id, code
DEADLINE = struct.Struct("!d")
MAX_BODY_BYTES = 64 * 1024 * 1024  # as the agent's gRPC server allows
# What a connection's reader buffers before it stops reading the socket (the writer then waits).
BUFFER_BYTES = 1024 * 1024
CALL, CANCEL, HEADERS, REPLY, END, ERROR = range(1, 7)
# A body of this size or more is written after its header rather than joined to it: a copy of a
# batch of output costs more than one more write.
SEPARATE_BODY_BYTES = 64 * 1024
# How long a link waits for a supervisor that has bound its socket but does not listen yet.
CONNECT_RETRY_SEC = 0.005

_SERVICE = pb.DESCRIPTOR.services_by_name["Agent"]
SERVICE = _SERVICE.full_name  # "capsule.agent.v1.Agent": what gRPC names each call after


@dataclass(frozen=True, slots=True)
class Method:
    """One method of the Agent service, as the link names and encodes it."""

    index: int
    name: str
    request: type[Message]
    reply: type[Message]
    streaming: bool


METHODS = tuple(
    Method(
        index,
        method.name,
        GetMessageClass(method.input_type),
        GetMessageClass(method.output_type),
        method.server_streaming,
    )
    for index, method in enumerate(_SERVICE.methods)
)
BY_NAME = {method.name: method for method in METHODS}
STREAMING = frozenset(method.name for method in METHODS if method.streaming)


class CallError(Exception):
    """A call that failed with a gRPC status: what the servicer raises, what an ERROR frame carries."""

    def __init__(self, code: Status, details: str = "") -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


@contextlib.asynccontextmanager
async def within(seconds: float | None) -> AsyncIterator[None]:
    """Ends the block after seconds (None: never) with DEADLINE_EXCEEDED; a TimeoutError of the
    block's own passes unchanged."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if deadline.expired():
            raise CallError(Status.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        raise


class CallContext:
    """What the servicer's methods use of grpc.aio.ServicerContext, for a call made without gRPC."""

    def __init__(self, timeout: float | None, on_headers: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._deadline = None if timeout is None else loop.time() + timeout
        self._on_headers = on_headers
        self.headers_sent = asyncio.Event()

    async def abort(self, code: Any, details: str = "") -> None:
        """Raises CallError: code, a Status, or a grpc.StatusCode (grpc's health servicer aborts so)."""
        raise CallError(Status(code if isinstance(code, int) else code.value[0]), details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    async def send_initial_metadata(self, _metadata: Any) -> None:
        if not self.headers_sent.is_set():
            self.headers_sent.set()
            if self._on_headers is not None:
                self._on_headers()


class LinkError(Exception):
    """A frame that breaks the protocol: its connection is closed."""


def frame(kind: int, call_id: int, code: int = 0, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind, call_id, code) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    """The next frame: kind, call id, code, body. IncompleteReadError at the end of the stream."""
    length, kind, call_id, code = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > MAX_BODY_BYTES or not CALL <= kind <= ERROR:
        raise LinkError(f"a frame of kind {kind} and {length} bytes")
    return kind, call_id, code, await reader.readexactly(length) if length else b""


# The supervisor's end.


async def serve(path: Path, servicer: Any) -> asyncio.Server:
    """Serves the servicer's methods on a Unix socket at path (replacing what was there)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(
        functools.partial(_connection, servicer), path=str(path), limit=BUFFER_BYTES
    )


async def _connection(servicer: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    calls: dict[int, asyncio.Task[None]] = {}
    try:
        while True:
            kind, call_id, code, body = await read_frame(reader)
            if kind == CANCEL:
                if (task := calls.get(call_id)) is not None:
                    task.cancel()
                continue
            if kind != CALL or call_id in calls:
                raise LinkError(f"a frame of kind {kind} for call {call_id}")
            task = asyncio.create_task(_call(servicer, writer, call_id, code, body))
            calls[call_id] = task
            task.add_done_callback(functools.partial(_forget, calls, call_id))
    except (asyncio.IncompleteReadError, ConnectionError, LinkError) as exc:
        # Not a warning: the capsule's own processes may write anything here, as often as they like.
        if not isinstance(exc, asyncio.IncompleteReadError) or exc.partial:
            logger.debug("a connection to the supervisor's socket ended: %s", exc)
    finally:
        for task in list(calls.values()):
            task.cancel()
        writer.close()


def _forget(calls: dict[int, asyncio.Task[None]], call_id: int, task: asyncio.Task[None]) -> None:
    if calls.get(call_id) is task:
        del calls[call_id]


async def _call(servicer: Any, writer: asyncio.StreamWriter, call_id: int, index: int, body: bytes) -> None:
    def send(kind: int, code: int = 0, payload: bytes = b"") -> None:
        if len(payload) > MAX_BODY_BYTES:  # as gRPC refuses a message over its limit: this call fails
            kind, code = ERROR, Status.RESOURCE_EXHAUSTED
            payload = f"a reply of {len(payload)} bytes, over the link's {MAX_BODY_BYTES}".encode()
        if writer.is_closing():
            return
        if len(payload) < SEPARATE_BODY_BYTES:
            writer.write(frame(kind, call_id, code, payload))
        else:
            writer.write(HEADER.pack(len(payload), kind, call_id, code))
            writer.write(payload)

    try:
        if index >= len(METHODS) or len(body) < DEADLINE.size:
            raise CallError(Status.UNIMPLEMENTED, "no such method")
        method = METHODS[index]
        (seconds,) = DEADLINE.unpack_from(body)
        timeout = seconds if seconds >= 0 and math.isfinite(seconds) else None
        try:
            request = method.request.FromString(body[DEADLINE.size :])
        except DecodeError:
            raise CallError(Status.INTERNAL, "the request could not be parsed") from None
        handler = getattr(servicer, method.name)
        if method.streaming:
            context = CallContext(None, on_headers=lambda: send(HEADERS))
            async for reply in handler(request, context):
                await context.send_initial_metadata(())
                # A reply serialized already (StreamOutput's) goes as it is.
                send(REPLY, payload=reply if isinstance(reply, bytes) else reply.SerializeToString())
                await writer.drain()
            await context.send_initial_metadata(())
            send(END)
        else:
            async with within(timeout):
                reply = await handler(request, CallContext(timeout))
            send(REPLY, payload=reply.SerializeToString())
    except CallError as exc:  # the servicer's status
        send(ERROR, exc.code, exc.details.encode())
    except ConnectionError:
        return
    except Exception as exc:  # what gRPC's server answers for a handler that raised
        logger.error("supervisor call failed", exc_info=exc)
        send(ERROR, Status.UNKNOWN, f"Unexpected {type(exc).__name__}".encode())
    with contextlib.suppress(ConnectionError):
        await writer.drain()

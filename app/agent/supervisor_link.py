"""The agent's end of the link to a sandbox's supervisor (app.agent.link): the Agent service's
methods on `SupervisorLink.stub`, as the generated gRPC stub's, raising the AioRpcError a channel
would raise (a lost supervisor is UNAVAILABLE), so the agent's code is the same as with gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from app.agent.link import (
    BUFFER_BYTES,
    BY_NAME,
    CALL,
    CANCEL,
    CONNECT_RETRY_SEC,
    DEADLINE,
    END,
    ERROR,
    HEADERS,
    REPLY,
    LinkError,
    Method,
    frame,
    read_frame,
)
from app.agent.rpc import call_deadline, status

logger = logging.getLogger(__name__)


def _deadline(timeout: float | None) -> bytes:
    return DEADLINE.pack(-1.0 if timeout is None else timeout)


def _status_of(code: int, details: bytes) -> grpc.aio.AioRpcError:
    return status(code, details.decode(errors="replace"))


def _lost(what: str) -> grpc.aio.AioRpcError:
    return status(grpc.StatusCode.UNAVAILABLE, f"the link to the capsule's supervisor {what}")


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    while True:
        try:
            return await asyncio.open_unix_connection(path, limit=BUFFER_BYTES)
        except ConnectionRefusedError:  # bound, not listening yet
            await asyncio.sleep(CONNECT_RETRY_SEC)
        except OSError as exc:
            raise _lost(f"cannot be made ({exc.strerror or exc})") from None


class SupervisorLink:
    """The agent's end of one supervisor's socket: its methods on `stub`, as the generated stub's."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._closed = False
        self.streams: set[_StreamCall] = set()
        self.stub = _Stub(self)

    async def open(self) -> None:
        """Connects to the supervisor, waiting while it has bound its socket but is not listening."""
        reader, self._writer = await _connect(self._path)
        self._reading = asyncio.create_task(self._read(reader), name=f"link-{self._path}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, call_id, code, body = await read_frame(reader)
                waiter = self._pending.get(call_id)
                if waiter is None or waiter.done():  # one given up on meanwhile
                    continue
                if kind == REPLY:
                    waiter.set_result(body)
                elif kind == ERROR:
                    waiter.set_exception(_status_of(code, body))
                else:
                    raise LinkError(f"a frame of kind {kind} for a unary call")
        except (asyncio.IncompleteReadError, ConnectionError, LinkError) as exc:
            if not self._closed:
                logger.debug("the link on %s ended: %s", self._path, exc)
        finally:
            self._closed = True
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(_lost("was lost"))

    async def unary(self, method: Method, request: Message, deadline_sec: float | None) -> Message:
        """One unary call: its reply, or the AioRpcError of its status."""
        if self._closed or self._writer is None:
            raise _lost("is closed")
        call_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._pending[call_id] = waiter
        try:
            async with call_deadline(deadline_sec):
                self._writer.write(
                    frame(CALL, call_id, method.index, _deadline(deadline_sec) + request.SerializeToString())
                )
                await self._writer.drain()
                body = await waiter
        except ConnectionError:
            raise _lost("was lost") from None
        except BaseException:
            # Past its deadline, or its caller gone (which cancels the waiter too): the handler ends.
            if not waiter.done() or waiter.cancelled():
                self._cancel(call_id)
            raise
        finally:
            del self._pending[call_id]
        return method.reply.FromString(body)

    def _cancel(self, call_id: int) -> None:
        if self._writer is not None and not self._closed:
            self._writer.write(frame(CANCEL, call_id))

    async def close(self) -> None:
        """Ends every call under way (as UNAVAILABLE) and every stream; later calls are UNAVAILABLE."""
        self._closed = True
        for call in list(self.streams):
            call.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._reading is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading


class _StreamCall:
    """A server-streaming call under way, on a connection of its own, as grpc.aio's call object."""

    def __init__(self, link: SupervisorLink, method: Method, request: Message) -> None:
        self._link, self._method = link, method
        self._writer: asyncio.StreamWriter | None = None
        self._ahead: tuple[int, int, int, bytes] | None = None  # a frame read while awaiting headers
        self._ended = False
        self._opening = asyncio.ensure_future(self._open(request))
        self._opening.add_done_callback(_retrieved)
        link.streams.add(self)

    async def _open(self, request: Message) -> asyncio.StreamReader:
        if self._link._closed:
            raise _lost("is closed")
        reader, self._writer = await _connect(self._link._path)
        self._writer.write(frame(CALL, 0, self._method.index, _deadline(None) + request.SerializeToString()))
        return reader

    async def _next(self) -> tuple[int, int, int, bytes]:
        if self._ended:
            raise status(grpc.StatusCode.CANCELLED, "Cancelled")
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            return ahead
        reader = await asyncio.shield(self._opening)
        try:
            return await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, LinkError):
            if self._ended:
                raise status(grpc.StatusCode.CANCELLED, "Cancelled") from None
            raise _lost("was lost") from None

    async def initial_metadata(self) -> Any:
        """Returns once the handler has begun (or has already ended)."""
        first = await self._next()
        if first[0] != HEADERS:
            self._ahead = first
        return grpc.aio.Metadata()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[Message]:
        try:
            while True:
                kind, _, code, body = await self._next()
                if kind == REPLY:
                    yield self._method.reply.FromString(body)
                elif kind == END:
                    return
                elif kind == ERROR:
                    raise _status_of(code, body)
                elif kind != HEADERS:
                    raise _lost(f"sent a frame of kind {kind} on a stream")
        finally:
            self._finish()

    def _finish(self) -> None:
        self._ended = True
        self._link.streams.discard(self)
        self._opening.cancel()
        if self._writer is not None:
            self._writer.close()

    def cancel(self) -> bool:
        """Ends the call, as a gRPC cancel does: its handler ends once its connection closes."""
        if self._ended:
            return False
        self._finish()
        return True


def _retrieved(opening: asyncio.Future[Any]) -> None:
    """Takes the outcome of a stream's opening that nobody may await (a call cancelled at once)."""
    if not opening.cancelled():
        opening.exception()


class _Stub:
    """The Agent service's methods by name, over the link (as agent_pb2_grpc.AgentStub's)."""

    def __init__(self, link: SupervisorLink) -> None:
        self._link = link

    def __getattr__(self, name: str) -> Any:
        method = BY_NAME.get(name)
        if method is None:
            raise AttributeError(name)
        link = self._link
        bound: Any
        if method.streaming:
            bound = functools.partial(_StreamCall, link, method)
        else:

            async def bound(request: Message, *, timeout: float | None = None) -> Message:  # noqa: ASYNC109 (the stub's own signature)
                return await link.unary(method, request, timeout)

        setattr(self, name, bound)  # built once per method
        return bound

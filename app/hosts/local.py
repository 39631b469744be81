"""The host agent of this process, called directly instead of through gRPC.

The embedded default runs its agent in the API server's own process. Through gRPC, each call and
each output batch was serialized, framed as HTTP/2, handed to gRPC's C-core threads and back, then
parsed again, all to cross from one half of the process to the other: a third of the server's CPU
in a bulk stream, and the latency of a thread hop each way on every exec and every output batch.

A LocalAgent gives HostClient what it uses of a channel and of the generated stub, calling the
agent's servicer in this process. The servicer and its errors stay the same: an error it raises as a
gRPC status (a CallError) reaches HostClient as the same AioRpcError a channel would raise, and a
call takes the same deadline. A server-streaming call runs its handler in a task of its own and
hands messages over through a small queue, so the handler runs ahead of its reader by a few messages
at most, as gRPC's flow control lets it, and ends, its finally blocks run, when the reader cancels.

So the embedded agent serves no socket at all (start_agent(None, ...)): nothing outside the process,
a capsule least of all, can reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

import grpc

from app.agent.link import SERVICE, STREAMING, CallContext, CallError
from app.agent.rpc import call_deadline, from_call_error, status

logger = logging.getLogger(__name__)

# Messages a streaming handler may run ahead of its reader.
STREAM_AHEAD = 8

# Set by app.tracing.enable where traces are on: opens a client span of one call to the agent, named
# as gRPC's instrumentation names a call to an agent elsewhere ("/capsule.agent.v1.Agent/Exec").
start_span: Callable[[str], AbstractContextManager[Any]] | None = None


def _span(method: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext() if start_span is None else start_span(f"/{SERVICE}/{method}")


_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")

_READY = grpc.ChannelConnectivity.READY
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


class _Unary(Generic[_Request, _Reply]):
    """A unary method of the servicer, called as the stub's would be: errors and deadline alike."""

    def __init__(
        self, agent: LocalAgent, name: str, method: Callable[[_Request, Any], Awaitable[_Reply]]
    ) -> None:
        self._agent = agent
        self._name = name
        self._method = method

    async def __call__(self, request: _Request, *, timeout: float | None = None) -> _Reply:  # noqa: ASYNC109 (the stub's own signature)
        self._agent.check_open()
        with _span(self._name):
            async with call_deadline(timeout):  # the servicer's CallError comes out as its AioRpcError
                return await self._method(request, CallContext(timeout))


_END = object()


class _StreamCall(Generic[_Reply]):
    """A server-streaming call under way: the handler in its own task, its messages through a queue."""

    def __init__(
        self, agent: LocalAgent, name: str, replies: Callable[[CallContext], AsyncIterator[_Reply]]
    ) -> None:
        self._agent = agent
        self._context = CallContext(None)
        self._queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_AHEAD)
        self._task = asyncio.get_running_loop().create_task(self._run(name, replies(self._context)))
        agent.streams.add(self)

    async def _run(self, name: str, replies: AsyncIterator[_Reply]) -> None:
        try:
            with _span(name):
                async for reply in replies:
                    await self._queue.put(reply)
            ended: Any = _END
        except CallError as exc:  # the servicer's status
            ended = from_call_error(exc)
        except asyncio.CancelledError:
            # A reader waiting in get() learns of it; one with messages still queued finds the task
            # done once it has read them.
            if not self._queue.full():
                self._queue.put_nowait(status(grpc.StatusCode.CANCELLED, "Cancelled"))
            raise
        except Exception as exc:  # what gRPC's server answers for a handler that raised
            logger.error("agent stream failed", exc_info=exc)
            ended = status(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}")
        finally:
            self._agent.streams.discard(self)
        await self._queue.put(ended)  # a reader that goes away cancels this task

    async def initial_metadata(self) -> Any:
        """Returns once the handler has sent its headers, or has ended."""
        headers = asyncio.ensure_future(self._context.headers_sent.wait())
        try:
            await asyncio.wait((headers, self._task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            headers.cancel()
        return grpc.aio.Metadata()

    def __aiter__(self) -> AsyncIterator[_Reply]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[_Reply]:
        while True:
            if self._task.done() and self._queue.empty():  # cancelled before it could say so
                raise status(grpc.StatusCode.CANCELLED, "Cancelled")
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                raise item
            yield item

    def cancel(self) -> bool:
        """Ends the handler, as a client's cancel ends the RPC on the server; False if it had ended."""
        if self._task.done():
            return False
        self._task.cancel()
        return True


class _Stream(Generic[_Request, _Reply]):
    """A server-streaming method of the servicer, called as the stub's would be."""

    def __init__(
        self, agent: LocalAgent, name: str, method: Callable[[_Request, Any], AsyncIterator[_Reply]]
    ) -> None:
        self._agent = agent
        self._name = name
        self._method = method

    def __call__(self, request: _Request) -> _StreamCall[_Reply]:
        self._agent.check_open()
        return _StreamCall(self._agent, self._name, lambda context: self._method(request, context))


class _Stub:
    """The agent's methods, by their gRPC names, on the servicer of this process."""

    def __init__(self, agent: LocalAgent, servicer: Any) -> None:
        self._agent = agent
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        kind = _Stream if name in STREAMING else _Unary
        bound: Any = kind(self._agent, name, method)
        setattr(self, name, bound)  # built once per method
        return bound


class LocalAgent:
    """The embedded agent as HostClient's channel, stub and health check, with no gRPC in between.

    Its state is READY while the agent runs and SHUTDOWN once the agent or this link has stopped;
    closing it ends the streams under way, as closing a channel does.
    """

    def __init__(self, servicer: Any, health: Any, stopped: Callable[[], bool]) -> None:
        """servicer: the agent's AgentServicer; health: its grpc health servicer; stopped: True once
        the agent has stopped."""
        self._stopped = stopped
        self._closed = asyncio.Event()
        self.streams: set[_StreamCall[Any]] = set()
        self.stub: Any = _Stub(self, servicer)
        self.health: Any = _Unary(self, "Check", health.Check)

    def check_open(self) -> None:
        """Raises what a call on a closed channel raises, once this link or the agent has stopped."""
        if self.get_state() is _SHUTDOWN:
            raise grpc.aio.UsageError("the embedded agent has stopped")

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY while the agent runs."""
        return _SHUTDOWN if self._closed.is_set() or self._stopped() else _READY

    async def wait_for_state_change(self, last: grpc.ChannelConnectivity) -> None:
        """Returns once the state is no longer last (READY is the only state that changes: to SHUTDOWN)."""
        await self._closed.wait()

    async def close(self, grace: float | None = None) -> None:
        """Ends every stream under way; later calls raise UsageError."""
        self._closed.set()
        calls = list(self.streams)
        for call in calls:
            call.cancel()

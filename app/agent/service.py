"""The Agent service's methods, the same for every way they are called: gRPC (app.agent.server), the
link into a sandbox (app.agent.link, which a capsule's supervisor serves them on) and the API
server's own process (app.hosts.local). It needs no grpc, so a supervisor loads none."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from app import wire
from app.agent.events import ProcessEvents
from app.agent.link import CallError
from app.agent.supervisor import Supervisor
from app.agent.tally import counted_stream
from app.domain import CapsuleSpec, HostCapsule, SignalScope, parse_selector
from app.errors import GRPC_STATUS, CapsuleError, InvalidRequest, Status
from app.pb import agent_pb2 as pb

logger = logging.getLogger(__name__)


class Inner(Protocol):
    """Where a sandboxed capsule's calls go (app.agent.sandbox.Sandbox): its supervisor inside."""

    async def unary(self, name: str, request: Any, deadline_sec: float | None) -> Any: ...

    def stream(self, name: str, request: Any) -> AsyncIterator[Any]: ...


class Capsules(Protocol):
    """The capsules the servicer serves: an agent's (app.agent.capsules), or a supervisor's one."""

    async def create(self, capsule_id: str, spec: CapsuleSpec) -> HostCapsule: ...

    def get(self, capsule_id: str) -> HostCapsule: ...

    def list_capsules(self) -> list[HostCapsule]: ...

    async def destroy(self, capsule_id: str) -> None: ...

    def sandbox(self, capsule_id: str) -> Inner | None: ...

    def supervisor(self, capsule_id: str) -> Supervisor: ...


Context = Any  # grpc.aio.ServicerContext; grpc ships no type hints
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Servicer = TypeVar("_Servicer", bound="AgentServicer")


def _status(exc: Exception) -> CallError:
    if isinstance(exc, CapsuleError):
        return CallError(GRPC_STATUS[exc.code], str(exc))
    # A bug: the caller learns nothing of the inside, the log gets the traceback.
    logger.error("agent call failed", exc_info=exc)
    return CallError(Status.INTERNAL, "internal error")


def abort_on_capsule_error(
    method: Callable[[_Servicer, _Req, Context], Awaitable[_Resp]],
) -> Callable[[_Servicer, _Req, Context], Awaitable[_Resp]]:
    """Turns a CapsuleError of a unary method into the matching gRPC status (a CallError)."""

    @functools.wraps(method)
    async def wrapper(self: _Servicer, request: _Req, context: Context) -> _Resp:
        try:
            return await method(self, request, context)
        except CallError:
            raise
        except Exception as exc:
            raise _status(exc) from None

    return wrapper


def abort_stream_on_capsule_error(
    method: Callable[[_Servicer, _Req, Context], AsyncIterator[_Resp]],
) -> Callable[[_Servicer, _Req, Context], AsyncIterator[_Resp]]:
    """The twin of abort_on_capsule_error for server-streaming methods."""

    @functools.wraps(method)
    async def wrapper(self: _Servicer, request: _Req, context: Context) -> AsyncIterator[_Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except CallError:
            raise
        except Exception as exc:
            raise _status(exc) from None

    return wrapper


def routed(
    capsule_of: Callable[[Any], str],
) -> Callable[
    [Callable[[_Servicer, _Req, Context], Awaitable[_Resp]]],
    Callable[[_Servicer, _Req, Context], Awaitable[_Resp]],
]:
    """A unary call on one capsule: a sandboxed capsule's goes, unchanged, to the supervisor inside."""

    def decorate(
        method: Callable[[_Servicer, _Req, Context], Awaitable[_Resp]],
    ) -> Callable[[_Servicer, _Req, Context], Awaitable[_Resp]]:
        name = method.__name__

        @functools.wraps(method)
        async def wrapper(self: _Servicer, request: _Req, context: Context) -> _Resp:
            sandbox = self._capsules.sandbox(capsule_of(request))
            if sandbox is not None:
                reply: _Resp = await sandbox.unary(name, request, context.time_remaining())
                return reply
            return await method(self, request, context)

        return wrapper

    return decorate


def routed_stream(
    capsule_of: Callable[[Any], str],
) -> Callable[
    [Callable[[_Servicer, _Req, Context], AsyncIterator[_Resp]]],
    Callable[[_Servicer, _Req, Context], AsyncIterator[_Resp]],
]:
    """The twin of routed for server-streaming calls."""

    def decorate(
        method: Callable[[_Servicer, _Req, Context], AsyncIterator[_Resp]],
    ) -> Callable[[_Servicer, _Req, Context], AsyncIterator[_Resp]]:
        name = method.__name__

        @functools.wraps(method)
        async def wrapper(self: _Servicer, request: _Req, context: Context) -> AsyncIterator[_Resp]:
            sandbox = self._capsules.sandbox(capsule_of(request))
            stream = method(self, request, context) if sandbox is None else sandbox.stream(name, request)
            async for message in stream:
                yield message

        return wrapper

    return decorate


def _capsule(request: Any) -> str:
    return str(request.capsule_id)


def _process_capsule(request: Any) -> str:
    return str(request.process.capsule_id)


def _scope(value: int) -> SignalScope:
    try:
        return wire.signal_scope(value)
    except KeyError:
        raise InvalidRequest(f"signal scope {value} is unknown: use GROUP or PROCESS") from None


class AgentServicer:
    """The Agent service: each call goes to the supervisor of its capsule. A call that fails raises
    CallError, its gRPC status, which each way of calling it (gRPC, the link, the in-process agent)
    says its own way."""

    def __init__(self, capsules: Capsules, events: ProcessEvents, *, serialized_output: bool = False) -> None:
        """serialized_output: StreamOutput yields each batch serialized already (the link sends
        bytes as they are), where gRPC and the in-process agent take messages."""
        self._capsules = capsules
        self._events = events
        self._serialized_output = serialized_output

    @abort_on_capsule_error
    async def CreateCapsule(self, request: pb.CreateCapsuleRequest, context: Context) -> pb.CapsuleInfo:
        spec = wire.capsule_spec(request)
        return wire.capsule_info_to_pb(await self._capsules.create(request.capsule_id, spec))

    @abort_on_capsule_error
    async def GetCapsule(self, request: pb.CapsuleRef, context: Context) -> pb.CapsuleInfo:
        return wire.capsule_info_to_pb(self._capsules.get(request.capsule_id))

    @abort_on_capsule_error
    async def ListCapsules(self, request: pb.Empty, context: Context) -> pb.CapsuleList:
        return pb.CapsuleList(
            capsules=[wire.capsule_info_to_pb(info) for info in self._capsules.list_capsules()]
        )

    @abort_on_capsule_error
    async def DestroyCapsule(self, request: pb.CapsuleRef, context: Context) -> pb.Empty:
        await self._capsules.destroy(request.capsule_id)
        return pb.Empty()

    @abort_on_capsule_error
    @routed(_capsule)
    async def Exec(self, request: pb.ExecRequest, context: Context) -> pb.ExecReply:
        supervisor = self._capsules.supervisor(request.capsule_id)
        return wire.exec_reply(await supervisor.exec(wire.exec_spec(request)))

    @abort_on_capsule_error
    @routed(_capsule)
    async def StartProcess(self, request: pb.StartRequest, context: Context) -> pb.ProcessInfo:
        supervisor = self._capsules.supervisor(request.capsule_id)
        info = supervisor.start(wire.process_spec(request), max_running=request.max_running)
        return wire.process_info_to_pb(info)

    @abort_on_capsule_error
    @routed(_capsule)
    async def ListProcesses(self, request: pb.CapsuleRef, context: Context) -> pb.ProcessList:
        supervisor = self._capsules.supervisor(request.capsule_id)
        return pb.ProcessList(
            processes=[wire.process_info_to_pb(info) for info in supervisor.list_processes()]
        )

    @abort_on_capsule_error
    @routed(_capsule)
    async def GetProcess(self, request: pb.ProcessRef, context: Context) -> pb.ProcessInfo:
        supervisor = self._capsules.supervisor(request.capsule_id)
        return wire.process_info_to_pb(supervisor.get(parse_selector(request.selector)))

    @abort_on_capsule_error
    @routed(_process_capsule)
    async def SignalProcess(self, request: pb.SignalRequest, context: Context) -> pb.ProcessInfo:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        info = supervisor.signal(parse_selector(ref.selector), request.signal, _scope(request.scope))
        return wire.process_info_to_pb(info)

    @abort_on_capsule_error
    @routed(_process_capsule)
    async def StopProcess(self, request: pb.StopRequest, context: Context) -> pb.ProcessInfo:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        return wire.process_info_to_pb(await supervisor.stop(parse_selector(ref.selector), request.grace_sec))

    @abort_on_capsule_error
    @routed(_process_capsule)
    async def SendInput(self, request: pb.InputRequest, context: Context) -> pb.Empty:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        await supervisor.send_input(parse_selector(ref.selector), request.data)
        return pb.Empty()

    @abort_on_capsule_error
    @routed(_capsule)
    async def CloseInput(self, request: pb.ProcessRef, context: Context) -> pb.Empty:
        supervisor = self._capsules.supervisor(request.capsule_id)
        await supervisor.close_input(parse_selector(request.selector))
        return pb.Empty()

    @abort_on_capsule_error
    @routed(_process_capsule)
    async def ResizeTerminal(self, request: pb.ResizeRequest, context: Context) -> pb.Empty:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        supervisor.resize_terminal(parse_selector(ref.selector), wire.terminal_size(request.size))
        return pb.Empty()

    @counted_stream
    @abort_stream_on_capsule_error
    @routed_stream(_process_capsule)
    async def StreamOutput(
        self, request: pb.OutputRequest, context: Context
    ) -> AsyncIterator[pb.OutputBatch | bytes]:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        async for batch in supervisor.output(parse_selector(ref.selector), request.from_seq):
            yield wire.serialized_output_batch(batch) if self._serialized_output else wire.output_batch(batch)

    @abort_on_capsule_error
    @routed(_capsule)
    async def GetOutputCounters(self, request: pb.CapsuleRef, context: Context) -> pb.OutputCounters:
        counts = self._capsules.supervisor(request.capsule_id).output_counts()
        return pb.OutputCounters(
            pipe_bytes=counts.pipe_bytes,
            log_bytes_held=counts.log_bytes_held,
            evicted_events=counts.evicted_events,
            evicted_bytes=counts.evicted_bytes,
        )

    @abort_stream_on_capsule_error
    async def WatchProcesses(
        self, request: pb.CapsuleRef, context: Context
    ) -> AsyncIterator[pb.ProcessEvent]:
        capsule_id = request.capsule_id or None
        if capsule_id is not None:
            self._capsules.sandbox(capsule_id)  # NotFound for an unknown capsule
        subscription = self._events.subscribe(capsule_id)
        try:
            # Headers tell the caller it is subscribed: events from now on reach it.
            await context.send_initial_metadata(())
            async for event in subscription.events():
                yield wire.process_event_to_pb(event)
        finally:
            subscription.close()

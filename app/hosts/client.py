"""Typed calls to one host agent, each with a deadline, with its errors mapped back to ours."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app import domain, metrics, wire
from app.config import Settings
from app.errors import CapsuleError, ErrorCode, HostUnavailable, error_from_status
from app.pb import agent_pb2 as pb

logger = logging.getLogger(__name__)

UNREACHABLE = "the capsule's host agent cannot be reached; retry later"
TIMED_OUT = "the capsule's host agent did not answer in time; retry later"
# Added to a call's own duration (an exec's timeout, a stop's grace) for killing, reaping, replying.
MARGIN_SEC = 5.0

_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
_Request_contra = TypeVar("_Request_contra", contravariant=True)
_Reply_co = TypeVar("_Reply_co", covariant=True)


class UnaryRpc(Protocol[_Request_contra, _Reply_co]):
    """A unary method of the generated stub."""

    def __call__(self, request: _Request_contra, *, timeout: float | None = None) -> Awaitable[_Reply_co]: ...


class StreamCall(Protocol[_Reply_co]):
    """A server-streaming call in progress."""

    def __aiter__(self) -> AsyncIterator[_Reply_co]: ...
    def initial_metadata(self) -> Awaitable[Any]: ...
    def cancel(self) -> bool: ...


class StreamRpc(Protocol[_Request_contra, _Reply_co]):
    """A server-streaming method of the generated stub."""

    def __call__(self, request: _Request_contra) -> StreamCall[_Reply_co]: ...


class AgentStub(Protocol):
    """agent_pb2_grpc.AgentStub with each method's message types, so mypy checks every call.

    grpc ships no types and protoc's .pyi covers the messages only; keep this in step with
    proto/agent.proto.
    """

    CreateCapsule: UnaryRpc[pb.CreateCapsuleRequest, pb.CapsuleInfo]
    GetCapsule: UnaryRpc[pb.CapsuleRef, pb.CapsuleInfo]
    ListCapsules: UnaryRpc[pb.Empty, pb.CapsuleList]
    DestroyCapsule: UnaryRpc[pb.CapsuleRef, pb.Empty]
    Exec: UnaryRpc[pb.ExecRequest, pb.ExecReply]
    StartProcess: UnaryRpc[pb.StartRequest, pb.ProcessInfo]
    ListProcesses: UnaryRpc[pb.CapsuleRef, pb.ProcessList]
    GetProcess: UnaryRpc[pb.ProcessRef, pb.ProcessInfo]
    SignalProcess: UnaryRpc[pb.SignalRequest, pb.ProcessInfo]
    StopProcess: UnaryRpc[pb.StopRequest, pb.ProcessInfo]
    SendInput: UnaryRpc[pb.InputRequest, pb.Empty]
    CloseInput: UnaryRpc[pb.ProcessRef, pb.Empty]
    ResizeTerminal: UnaryRpc[pb.ResizeRequest, pb.Empty]
    StreamOutput: StreamRpc[pb.OutputRequest, pb.OutputBatch]
    WatchProcesses: StreamRpc[pb.CapsuleRef, pb.ProcessEvent]


def _count(rpc: str, status: str, start: float) -> None:
    metrics.HOST_CALLS.labels(rpc, status).inc()
    metrics.HOST_CALL_SECONDS.labels(rpc).observe(time.perf_counter() - start)


def _cancelled_from_outside() -> bool:
    """True when a CancelledError came from gRPC (its channel closed), not from our own task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class Channel(Protocol):
    """What HostClient uses of a grpc.aio.Channel; app.hosts.local.LocalAgent has it too."""

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity: ...
    async def wait_for_state_change(self, last: grpc.ChannelConnectivity) -> None: ...


class HostClient:
    """The agent's RPCs for one host; get one from HostPool.client()."""

    def __init__(
        self,
        host_id: str,
        channel: Channel,
        stub: AgentStub,
        settings: Settings,
        *,
        health: UnaryRpc[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse] | None = None,
    ) -> None:
        """health: the health check's Check; by default the one of the gRPC channel."""
        self.host_id = host_id
        self._channel = channel
        self._stub = stub
        self._settings = settings
        self._health = health or health_pb2_grpc.HealthStub(channel).Check

    async def answers(self, timeout_sec: float) -> bool:
        """True when the agent answers its gRPC health check as SERVING within timeout_sec."""
        try:
            reply = await self._health(health_pb2.HealthCheckRequest(service=""), timeout=timeout_sec)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError):
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def create_capsule(
        self, capsule_id: str, spec: domain.CapsuleSpec | None = None
    ) -> domain.HostCapsule:
        """Creates the capsule's workspace and supervisor on the host; an existing one is returned."""
        request = wire.create_capsule_request(capsule_id, spec or domain.CapsuleSpec())
        reply = await self._unary("CreateCapsule", self._stub.CreateCapsule, request)
        return wire.capsule_info(reply)

    async def get_capsule(self, capsule_id: str) -> domain.HostCapsule:
        """What the host holds of one capsule, its usage included; NotFound when it holds none."""
        reply = await self._unary("GetCapsule", self._stub.GetCapsule, pb.CapsuleRef(capsule_id=capsule_id))
        return wire.capsule_info(reply)

    async def destroy_capsule(self, capsule_id: str) -> None:
        """Kills every process of the capsule and removes its workspace."""
        await self._unary("DestroyCapsule", self._stub.DestroyCapsule, pb.CapsuleRef(capsule_id=capsule_id))

    async def list_capsules(self) -> list[domain.HostCapsule]:
        """Every capsule the agent holds."""
        reply = await self._unary("ListCapsules", self._stub.ListCapsules, pb.Empty())
        return [wire.capsule_info(c) for c in reply.capsules]

    async def exec(self, capsule_id: str, spec: domain.ExecSpec) -> domain.ExecResult:
        """Runs a command to completion or its timeout."""
        run_sec = spec.timeout_sec or self._settings.exec_default_timeout_sec
        reply = await self._unary(
            "Exec", self._stub.Exec, wire.exec_request(capsule_id, spec), deadline_sec=run_sec + MARGIN_SEC
        )
        return wire.exec_result(reply)

    async def start_process(
        self, capsule_id: str, spec: domain.ProcessSpec, *, max_running: int = 0
    ) -> domain.ProcessInfo:
        """Starts a background process, unless the capsule runs max_running already (0: no limit)."""
        request = wire.start_request(capsule_id, spec, max_running=max_running)
        reply = await self._unary("StartProcess", self._stub.StartProcess, request)
        return wire.process_info(reply)

    async def list_processes(self, capsule_id: str) -> list[domain.ProcessInfo]:
        """Running processes first, then retained exited ones."""
        reply = await self._unary(
            "ListProcesses", self._stub.ListProcesses, pb.CapsuleRef(capsule_id=capsule_id)
        )
        return [wire.process_info(p) for p in reply.processes]

    async def get_process(self, capsule_id: str, selector: str) -> domain.ProcessInfo:
        """One process by PID or tag."""
        reply = await self._unary("GetProcess", self._stub.GetProcess, wire.process_ref(capsule_id, selector))
        return wire.process_info(reply)

    async def signal_process(
        self,
        capsule_id: str,
        selector: str,
        *,
        signal: signal.Signals,
        scope: domain.SignalScope,
    ) -> domain.ProcessInfo:
        """Sends a signal to a process or its group."""
        scope_value: Any = wire.signal_scope_to_pb(scope)  # an int; the stubs want the enum type
        request = pb.SignalRequest(
            process=wire.process_ref(capsule_id, selector), signal=int(signal), scope=scope_value
        )
        return wire.process_info(await self._unary("SignalProcess", self._stub.SignalProcess, request))

    async def stop_process(self, capsule_id: str, selector: str, *, grace_sec: float) -> domain.ProcessInfo:
        """SIGTERM, SIGKILL after grace_sec; answers once the process has exited."""
        request = pb.StopRequest(process=wire.process_ref(capsule_id, selector), grace_sec=grace_sec)
        reply = await self._unary(
            "StopProcess", self._stub.StopProcess, request, deadline_sec=grace_sec + MARGIN_SEC
        )
        return wire.process_info(reply)

    async def send_input(self, capsule_id: str, selector: str, data: bytes) -> None:
        """Writes bytes to a process's stdin."""
        request = pb.InputRequest(process=wire.process_ref(capsule_id, selector), data=data)
        await self._unary("SendInput", self._stub.SendInput, request)

    async def close_input(self, capsule_id: str, selector: str) -> None:
        """Closes a process's stdin."""
        await self._unary("CloseInput", self._stub.CloseInput, wire.process_ref(capsule_id, selector))

    async def resize_terminal(self, capsule_id: str, selector: str, size: domain.TerminalSize) -> None:
        """Gives a process's pseudo-terminal a new size."""
        request = pb.ResizeRequest(
            process=wire.process_ref(capsule_id, selector), size=wire.terminal_size_to_pb(size)
        )
        await self._unary("ResizeTerminal", self._stub.ResizeTerminal, request)

    async def stream_output(
        self, capsule_id: str, selector: str, from_seq: int
    ) -> AsyncGenerator[list[domain.OutputEvent], None]:
        """Batches of output events from from_seq on; ends after the exit event."""
        request = pb.OutputRequest(process=wire.process_ref(capsule_id, selector), from_seq=from_seq)
        async for batch in self._stream("StreamOutput", self._stub.StreamOutput, request):
            yield wire.output_events(batch)

    async def watch_processes(
        self, capsule_id: str = "", *, subscribed: asyncio.Event | None = None
    ) -> AsyncGenerator[domain.ProcessEvent, None]:
        """STARTED and EXITED events of one capsule, or of every capsule when capsule_id is empty.

        subscribed is set once the agent has registered the watch: every event after that arrives.
        """
        request = pb.CapsuleRef(capsule_id=capsule_id)
        async for message in self._stream(
            "WatchProcesses", self._stub.WatchProcesses, request, subscribed=subscribed
        ):
            yield wire.process_event(message)

    async def _unary(
        self,
        rpc: str,
        method: UnaryRpc[_Request, _Reply],
        request: _Request,
        *,
        deadline_sec: float | None = None,
    ) -> _Reply:
        """Calls method (the stub's, named rpc in the logs) once the channel is ready, with a deadline."""
        await self._connected(rpc)
        deadline = self._settings.host_call_timeout_sec if deadline_sec is None else deadline_sec
        start = time.perf_counter()
        try:
            reply = await method(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            _count(rpc, exc.code().name, start)
            raise self._error(rpc, exc) from exc
        except grpc.aio.UsageError as exc:  # the pool closed this channel
            raise HostUnavailable(UNREACHABLE) from exc
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise HostUnavailable(UNREACHABLE) from None
            raise
        _count(rpc, "OK", start)
        return reply

    async def _stream(
        self,
        rpc: str,
        method: StreamRpc[_Request, _Reply],
        request: _Request,
        *,
        subscribed: asyncio.Event | None = None,
    ) -> AsyncGenerator[_Reply, None]:
        # No deadline: a stream lasts as long as its process; keepalive notices a dead agent.
        await self._connected(rpc)
        try:
            call = method(request)
        except grpc.aio.UsageError as exc:
            raise HostUnavailable(UNREACHABLE) from exc
        status = "CANCELLED"  # ended by its caller, unless the agent says otherwise
        try:
            if subscribed is not None:  # the agent sends its headers once the stream is set up
                await call.initial_metadata()
                subscribed.set()
            async for message in call:
                yield message
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
            raise self._error(rpc, exc) from exc
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise HostUnavailable(UNREACHABLE) from None
            raise
        finally:
            metrics.HOST_CALLS.labels(rpc, status).inc()
            call.cancel()  # the caller stopped early or was cancelled: end the RPC on the agent too

    async def _connected(self, rpc: str) -> None:
        """Returns once the channel is READY; raises HostUnavailable within the connect timeout."""
        try:
            state = self._channel.get_state(try_to_connect=True)
            # From IDLE or CONNECTING, a failure is our own attempt refused: no need to wait longer.
            # From TRANSIENT_FAILURE (sticky while gRPC retries in the background), wait: a
            # restarted agent is picked up within the reconnect backoff.
            fail_fast = state is not _FAILED
            async with asyncio.timeout(self._settings.host_connect_timeout_sec):
                while state is not _READY:
                    if state is _SHUTDOWN or (state is _FAILED and fail_fast):
                        break
                    await self._channel.wait_for_state_change(state)
                    state = self._channel.get_state(try_to_connect=True)
        except (TimeoutError, grpc.aio.UsageError, RuntimeError):
            state = _SHUTDOWN
        if state is not _READY:
            metrics.HOST_CALLS.labels(rpc, "UNREACHABLE").inc()
            # The exit recorder retries its stream twice a second and logs the host's state once;
            # every other call that fails says so.
            level = logging.DEBUG if rpc == "WatchProcesses" else logging.WARNING
            logger.log(level, "host %s: %s: cannot connect to the agent (%s)", self.host_id, rpc, state.name)
            raise HostUnavailable(UNREACHABLE)

    def _error(self, rpc: str, exc: grpc.aio.AioRpcError) -> CapsuleError:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            logger.warning("host %s: %s: %s (%s)", self.host_id, rpc, code.name, exc.details())
            return HostUnavailable(UNREACHABLE)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            logger.warning("host %s: %s: no answer before the deadline", self.host_id, rpc)
            return HostUnavailable(TIMED_OUT)
        error = error_from_status(code.value[0], exc.details() or "")
        if error.code is ErrorCode.INTERNAL:
            logger.error(
                "host %s: %s failed in the agent: %s %s", self.host_id, rpc, code.name, exc.details()
            )
        return error

"""The host agent's gRPC server: routes each call to a capsule's supervisor; errors become status."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app import wire
from app.agent.capsules import Capsules
from app.agent.events import ProcessEvents
from app.config import Settings
from app.datadir import DirectoryLock, lock_agent_dir
from app.domain import SignalScope, parse_selector
from app.errors import GRPC_STATUS, CapsuleError, InvalidRequest
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # API servers ping quiet streams to notice a vanished agent: frequent pings are no abuse here,
    # so they never earn GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
]
SERVICE_NAME = "capsule.agent.v1.Agent"

Context = Any  # grpc.aio.ServicerContext; grpc ships no type hints
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Servicer = TypeVar("_Servicer", bound="AgentServicer")


async def _abort(context: Context, exc: Exception) -> NoReturn:
    if isinstance(exc, CapsuleError):
        await context.abort(GRPC_STATUS[exc.code], str(exc))
    else:  # a bug: the caller learns nothing of the inside, the log gets the traceback
        logger.error("agent call failed", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("context.abort returned")


def abort_on_capsule_error(
    method: Callable[[_Servicer, _Req, Context], Awaitable[_Resp]],
) -> Callable[[_Servicer, _Req, Context], Awaitable[_Resp]]:
    """Turns a CapsuleError of a unary method into the matching gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: _Servicer, request: _Req, context: Context) -> _Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

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
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def _scope(value: int) -> SignalScope:
    try:
        return wire.signal_scope(value)
    except KeyError:
        raise InvalidRequest(f"signal scope {value} is unknown: use GROUP or PROCESS") from None


class AgentServicer(agent_pb2_grpc.AgentServicer):  # type: ignore[misc]
    """The Agent service: each call goes to the supervisor of its capsule."""

    def __init__(self, capsules: Capsules, events: ProcessEvents) -> None:
        self._capsules = capsules
        self._events = events

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
    async def Exec(self, request: pb.ExecRequest, context: Context) -> pb.ExecReply:
        supervisor = self._capsules.supervisor(request.capsule_id)
        return wire.exec_reply(await supervisor.exec(wire.exec_spec(request)))

    @abort_on_capsule_error
    async def StartProcess(self, request: pb.StartRequest, context: Context) -> pb.ProcessInfo:
        supervisor = self._capsules.supervisor(request.capsule_id)
        info = supervisor.start(wire.process_spec(request), max_running=request.max_running)
        return wire.process_info_to_pb(info)

    @abort_on_capsule_error
    async def ListProcesses(self, request: pb.CapsuleRef, context: Context) -> pb.ProcessList:
        supervisor = self._capsules.supervisor(request.capsule_id)
        return pb.ProcessList(
            processes=[wire.process_info_to_pb(info) for info in supervisor.list_processes()]
        )

    @abort_on_capsule_error
    async def GetProcess(self, request: pb.ProcessRef, context: Context) -> pb.ProcessInfo:
        supervisor = self._capsules.supervisor(request.capsule_id)
        return wire.process_info_to_pb(supervisor.get(parse_selector(request.selector)))

    @abort_on_capsule_error
    async def SignalProcess(self, request: pb.SignalRequest, context: Context) -> pb.ProcessInfo:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        info = supervisor.signal(parse_selector(ref.selector), request.signal, _scope(request.scope))
        return wire.process_info_to_pb(info)

    @abort_on_capsule_error
    async def StopProcess(self, request: pb.StopRequest, context: Context) -> pb.ProcessInfo:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        return wire.process_info_to_pb(await supervisor.stop(parse_selector(ref.selector), request.grace_sec))

    @abort_on_capsule_error
    async def SendInput(self, request: pb.InputRequest, context: Context) -> pb.Empty:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        await supervisor.send_input(parse_selector(ref.selector), request.data)
        return pb.Empty()

    @abort_on_capsule_error
    async def CloseInput(self, request: pb.ProcessRef, context: Context) -> pb.Empty:
        supervisor = self._capsules.supervisor(request.capsule_id)
        await supervisor.close_input(parse_selector(request.selector))
        return pb.Empty()

    @abort_stream_on_capsule_error
    async def StreamOutput(
        self, request: pb.OutputRequest, context: Context
    ) -> AsyncIterator[pb.OutputBatch]:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        async for batch in supervisor.output(parse_selector(ref.selector), request.from_seq):
            yield wire.output_batch(batch)

    @abort_stream_on_capsule_error
    async def WatchProcesses(
        self, request: pb.CapsuleRef, context: Context
    ) -> AsyncIterator[pb.ProcessEvent]:
        capsule_id = request.capsule_id or None
        if capsule_id is not None:
            self._capsules.supervisor(capsule_id)  # NotFound for an unknown capsule
        subscription = self._events.subscribe(capsule_id)
        try:
            # Headers tell the caller it is subscribed: events from now on reach it.
            await context.send_initial_metadata(())
            async for event in subscription.events():
                yield wire.process_event_to_pb(event)
        finally:
            subscription.close()


class AgentHandle:
    """A running agent: its port, and stop() that leaves no process behind."""

    def __init__(
        self,
        *,
        server: Any,
        port: int,
        capsules: Capsules,
        events: ProcessEvents,
        health: Any,
        lock: DirectoryLock,
    ):
        self.port = port
        self._server = server
        self._capsules = capsules
        self._events = events
        self._health = health
        self._lock = lock
        self._stopped = False

    async def stop(self, grace: float = 1.0) -> None:
        """Kills every process group of every capsule, stops the gRPC server, then lets the directory go."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._health.enter_graceful_shutdown()
            await self._capsules.close()
            self._events.end()
            await self._server.stop(grace)
        finally:
            self._lock.release()


async def start_agent(address: str, settings: Settings) -> AgentHandle:
    """Serves the Agent and the gRPC health service on address (port 0 picks a free port).

    Raises DirectoryInUse, having touched nothing, when another agent holds settings.agent_dir.
    """
    # First of all: the load below kills what a previous agent left, which would be the live
    # processes of an agent still running on this directory.
    lock = await asyncio.to_thread(lock_agent_dir, settings)
    try:
        logger.warning(
            "plain runtime: capsule processes run on this host as uid %d and nothing isolates them "
            "from each other, from the agent or from the host",
            os.getuid(),
        )
        events = ProcessEvents()
        capsules = Capsules(settings, events)
        await asyncio.to_thread(capsules.load, lock)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        agent_pb2_grpc.add_AgentServicer_to_server(AgentServicer(capsules, events), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        port = server.add_insecure_port(address)
        await server.start()
    except BaseException:  # nothing runs yet: the capsules were only loaded
        lock.release()
        raise
    logger.info("agent serving on %s (port %d), data in %s", address, port, settings.agent_dir)
    return AgentHandle(
        server=server, port=port, capsules=capsules, events=events, health=health_servicer, lock=lock
    )


async def run_agent(address: str, settings: Settings) -> None:
    """Serves until cancelled, SIGTERM or SIGINT, then stops and kills every capsule's processes.

    The one place the agent's signals are handled, for `capsule agent` and for scripts alike.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    # Installed before the start, so a signal during it stops the agent cleanly once it is up.
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        handle = await start_agent(address, settings)
        try:
            await stop.wait()
            logger.info("agent stopping")
        finally:
            await handle.stop()
    finally:  # only now: a second signal during the stop must not kill the agent half-way
        for signum in installed:
            loop.remove_signal_handler(signum)

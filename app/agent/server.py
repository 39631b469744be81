"""The host agent's gRPC server: routes each call to a capsule's supervisor; errors become status."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app import wire
from app.agent import metrics as agent_metrics
from app.agent.capsules import Capsules
from app.agent.events import ProcessEvents
from app.agent.metrics import counted_stream
from app.agent.sandbox import SandboxRuntime
from app.config import ConfigError, Settings
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
# The address of an agent that serves no socket, called in its own process only.
IN_PROCESS = "in-process"

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
    ) -> AsyncIterator[pb.OutputBatch]:
        ref = request.process
        supervisor = self._capsules.supervisor(ref.capsule_id)
        async for batch in supervisor.output(parse_selector(ref.selector), request.from_seq):
            yield wire.output_batch(batch)

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


class AgentHandle:
    """A running agent: its port, and stop() that leaves no process behind."""

    def __init__(
        self,
        *,
        server: Any,
        servicer: AgentServicer,
        port: int,
        address: str,
        capsules: Capsules,
        events: ProcessEvents,
        health: Any,
        lock: DirectoryLock,
        socket_dir_fd: int | None = None,
    ):
        self.port = port
        self.address = address  # what a client in this process connects to
        self.servicer = servicer  # for a caller in this process: app.hosts.local.LocalAgent
        self.health = health
        self._socket_dir_fd = socket_dir_fd
        self._server = server
        self._capsules = capsules
        self._events = events
        self._lock = lock
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once stop() has begun."""
        return self._stopped

    async def stop(self, grace: float = 1.0) -> None:
        """Kills every process group of every capsule, stops the gRPC server, then lets the directory go."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.health.enter_graceful_shutdown()
            agent_metrics.forget(self._capsules)
            await self._capsules.close()
            self._events.end()
            if self._server is not None:
                await self._server.stop(grace)
        finally:
            if self._socket_dir_fd is not None:
                os.close(self._socket_dir_fd)
            self._lock.release()


async def choose_runtime(settings: Settings) -> SandboxRuntime | None:
    """The sandbox runtime where settings ask for it, or for auto where it works; None for plain.

    Says at every start which runtime it is, and for plain what a sandbox would need.
    """
    if settings.runtime == "plain":
        missing = "CAPSULE_RUNTIME=plain"
        runtime = None
    else:
        runtime, missing = await SandboxRuntime.probe(settings)
        if runtime is None and settings.runtime == "sandbox":
            raise ConfigError(f"CAPSULE_RUNTIME=sandbox, but a sandbox does not work here: {missing}")
    if runtime is not None and runtime.cgroups.version == 0:
        logger.warning(
            "sandbox runtime with rlimits (no cgroups here): each capsule in namespaces, its processes "
            "counted on a uid of its own; memory and CPU go unlimited and unmeasured (bwrap %s)",
            runtime.bwrap,
        )
        return runtime
    if runtime is not None:
        logger.info(
            "sandbox runtime: each capsule in namespaces and a %s cgroup of its own (bwrap %s)",
            f"v{runtime.cgroups.version}",
            runtime.bwrap,
        )
        return runtime
    logger.warning(
        "plain runtime (%s): capsule processes run on this host as uid %d and nothing isolates them "
        "from each other, from the agent or from the host",
        missing,
        os.getuid(),
    )
    return None


async def start_agent(address: str | None, settings: Settings) -> AgentHandle:
    """Serves the Agent and the gRPC health service on address (port 0 picks a free port); with
    address None, serves nothing: the agent is called in this process (app.hosts.local) alone.

    Raises DirectoryInUse, having touched nothing, when another agent holds settings.agent_dir.
    """
    # First of all: the load below kills what a previous agent left, which would be the live
    # processes of an agent still running on this directory.
    lock = await asyncio.to_thread(lock_agent_dir, settings)
    server: Any = None
    target, socket_dir_fd, port = "", None, 0
    try:
        runtime = await choose_runtime(settings)
        events = ProcessEvents()
        capsules = Capsules(settings, events, runtime)
        waiting = await asyncio.to_thread(capsules.load, lock)
        await capsules.resume(waiting)
        capsules.prepare_spare()
        servicer = AgentServicer(capsules, events)
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        agent_metrics.watch(capsules)
        capsules.count_output()
        if address is not None:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            target, socket_dir_fd = _bind_target(address)
            port = server.add_insecure_port(target)
            if socket_dir_fd is not None:
                port = 0  # gRPC answers 1 for a Unix socket
            await server.start()
    except BaseException:  # nothing runs yet: the capsules were only loaded
        lock.release()
        raise
    if address is None:
        local = IN_PROCESS
        logger.info("agent running in this process, data in %s", settings.agent_dir)
    else:
        logger.info(
            "agent serving on %s, data in %s",
            address if port == 0 else f"{address} (port {port})",
            settings.agent_dir,
        )
        local = target if socket_dir_fd is not None else f"{address.rsplit(':', 1)[0]}:{port}"
    return AgentHandle(
        server=server,
        servicer=servicer,
        port=port,
        address=local,
        capsules=capsules,
        events=events,
        health=health_servicer,
        lock=lock,
        socket_dir_fd=socket_dir_fd,
    )


def _bind_target(address: str) -> tuple[str, int | None]:
    """What gRPC binds for an address; a unix:PATH one through a descriptor of PATH's directory,
    because a socket's path holds at most 107 bytes and a data directory may lie deep."""
    if not address.startswith("unix:"):
        return address, None
    path = Path(address.removeprefix("unix:").removeprefix("//"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"unix:/proc/self/fd/{fd}/{path.name}", fd


async def run_agent(address: str, settings: Settings, *, metrics: str | None = None) -> None:
    """Serves until cancelled, SIGTERM or SIGINT, then stops and kills every capsule's processes.

    The one place the agent's signals are handled, for `capsule agent` and for scripts alike.
    metrics: HOST:PORT to serve the agent's Prometheus metrics on.
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
        if metrics:
            agent_metrics.serve(metrics)
        try:
            await stop.wait()
            logger.info("agent stopping")
        finally:
            await handle.stop()
    finally:  # only now: a second signal during the stop must not kill the agent half-way
        for signum in installed:
            loop.remove_signal_handler(signum)

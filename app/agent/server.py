"""The host agent's gRPC server: the Agent service (app.agent.service) and gRPC's health service on
an address; each call's CallError becomes its gRPC status."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app.agent import tally
from app.agent.capsules import Capsules
from app.agent.events import ProcessEvents
from app.agent.link import BY_NAME, SERVICE, CallError
from app.agent.rpc import GRPC_CODES
from app.agent.sandbox import SandboxRuntime
from app.agent.service import AgentServicer
from app.config import ConfigError, Settings
from app.datadir import DirectoryLock, lock_agent_dir
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
# The address of an agent that serves no socket, called in its own process only.
IN_PROCESS = "in-process"


class GrpcServicer:
    """The servicer's methods as gRPC serves them: a call's CallError is aborted with its status."""

    def __init__(self, servicer: AgentServicer) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        wrapper: Callable[..., Any]
        if BY_NAME[name].streaming:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for reply in method(request, context):
                        yield reply
                except CallError as exc:
                    await context.abort(GRPC_CODES[exc.code], exc.details)

            wrapper = stream
        else:

            async def unary(request: Any, context: Any) -> Any:
                try:
                    return await method(request, context)
                except CallError as exc:
                    await context.abort(GRPC_CODES[exc.code], exc.details)

            wrapper = unary
        return functools.wraps(method)(wrapper)


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
            tally.forget(self._capsules)
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
        await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        tally.watch(capsules)
        capsules.count_output()
        if address is not None:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            agent_pb2_grpc.add_AgentServicer_to_server(GrpcServicer(servicer), server)
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
            from app.agent import metrics as agent_metrics  # the Prometheus client, where asked for

            agent_metrics.serve(metrics)
        try:
            await stop.wait()
            logger.info("agent stopping")
        finally:
            await handle.stop()
    finally:  # only now: a second signal during the stop must not kill the agent half-way
        for signum in installed:
            loop.remove_signal_handler(signum)

"""A capsule's supervisor inside its sandbox: the agent's service for this one capsule, on a Unix socket.

`python -m app.agent.inner SETTINGS_JSON` runs as the sandbox's unprivileged user, in its namespaces,
with the workspace at /workspace. It is the same supervisor as the plain runtime's; the host agent
forwards each call for the capsule here, over the link of app.agent.link, and relays the lifecycle
events it publishes.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import resource
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from app import malloc
from app.agent import link
from app.agent.events import ProcessEvents
from app.agent.meter import CgroupMeters, Meters
from app.agent.supervisor import Supervisor
from app.config import Settings
from app.domain import CapsuleSpec, HostCapsule
from app.errors import NotFound

logger = logging.getLogger(__name__)

WORKSPACE = Path("/workspace")
RUN_DIR = Path("/run/capsule")  # the capsule's own directory on the host, bound here
SOCKET = RUN_DIR / "agent.sock"
PR_SET_DUMPABLE = 4
SPARE_PREFIX = "spare-"  # a sandbox started ahead, for the next capsule
# What of the agent's settings the supervisor inside needs.
PASSED_SETTINGS = (
    "output_cap_bytes",
    "retention_sec",
    "exec_output_cap_bytes",
    "exec_default_timeout_sec",
    "input_timeout_sec",
)


def settings_argument(
    settings: Settings,
    capsule_id: str,
    *,
    lifeline: int | None = None,
    rlimit: bool = False,
    max_processes: int | None = None,
    cgroups: bool = False,
) -> str:
    """The one argument the supervisor inside is started with; lifeline, the descriptor it leaves on
    once it reads end of file there (the agent's process is gone); rlimit, that the host has no
    cgroups, so the supervisor sets RLIMIT_NPROC on itself: max_processes at once, or a spare's
    on the CreateCapsule that makes it a capsule's; cgroups, that the capsule's cgroups (v1) are
    bound at /sys/fs/cgroup/<controller> for a cgroup per process."""
    passed = {name: getattr(settings, name) for name in PASSED_SETTINGS}
    return json.dumps(
        {
            "capsule_id": capsule_id,
            "settings": passed,
            "lifeline": lifeline,
            "rlimit": rlimit,
            "max_processes": max_processes,
            "cgroups": cgroups,
        }
    )


def limit_own_processes(max_processes: int) -> None:
    """RLIMIT_NPROC, soft and hard, of maxProcesses beyond the supervisor's own threads: every
    process of the capsule inherits it, none can raise it, and the kernel counts the capsule's uid."""
    allowed = max_processes + len(os.listdir("/proc/self/task"))
    resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))


def _watch_lifeline(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Ends the supervisor, and with it the sandbox's PID namespace and all in it, once the agent is gone."""
    os.set_inheritable(fd, False)  # no process of the capsule holds it

    def readable() -> None:
        try:
            said = os.read(fd, 1)
        except BlockingIOError:
            return
        except OSError:
            said = b""
        if not said:
            logger.warning("the agent is gone: the sandbox ends")
            os._exit(1)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


class OneCapsule:
    """The Capsules of a sandbox: exactly its own capsule, at /workspace."""

    def __init__(
        self,
        capsule_id: str,
        settings: Settings,
        events: ProcessEvents,
        *,
        rlimit: bool = False,
        meters: Meters | None = None,
    ) -> None:
        self._capsule_id = capsule_id
        self._rlimit = rlimit
        self._supervisor = Supervisor(
            capsule_id,
            WORKSPACE,
            settings,
            events.publish,
            sessions_file=RUN_DIR / "sessions",
            meters=meters,
        )

    def supervisor(self, capsule_id: str) -> Supervisor:
        """The capsule's supervisor; any other id is NotFound."""
        if capsule_id != self._capsule_id:
            raise NotFound(f"no capsule {capsule_id} in this sandbox")
        return self._supervisor

    def sandbox(self, capsule_id: str) -> None:
        """Calls are served here, by the supervisor itself: there is no sandbox further in."""
        self.supervisor(capsule_id)

    def get(self, capsule_id: str) -> HostCapsule:
        """The capsule as the supervisor inside sees it."""
        supervisor = self.supervisor(capsule_id)
        return HostCapsule(
            capsule_id=capsule_id, workspace=str(WORKSPACE), running_processes=supervisor.running_count()
        )

    def list_capsules(self) -> list[HostCapsule]:
        """The one capsule."""
        return [self.get(self._capsule_id)]

    async def create(self, capsule_id: str, spec: CapsuleSpec) -> HostCapsule:
        """The capsule exists from the start; a spare sandbox becomes the capsule it is created for."""
        if self._capsule_id.startswith(SPARE_PREFIX) and not capsule_id.startswith(SPARE_PREFIX):
            if self._rlimit:
                limit_own_processes(spec.limits.max_processes)
            self._capsule_id = self._supervisor.capsule_id = capsule_id
        return self.get(capsule_id)

    async def destroy(self, capsule_id: str) -> None:
        """Kills every process of the capsule, each exit published; the sandbox ends next."""
        await self.supervisor(capsule_id).close()

    async def close(self) -> None:
        """Kills every process of the capsule, each exit published."""
        await self._supervisor.close()


async def serve(argument: str) -> None:
    """Serves the capsule on the socket until SIGTERM, or until the sandbox ends around it."""
    from app.agent.service import AgentServicer

    given: dict[str, Any] = json.loads(argument)
    known = {f.name for f in fields(Settings)}
    settings = Settings(**{k: v for k, v in given["settings"].items() if k in known})
    events = ProcessEvents()
    if given.get("max_processes") is not None:
        limit_own_processes(int(given["max_processes"]))
    meters = CgroupMeters() if given.get("cgroups") and CgroupMeters.usable() else None
    capsule = OneCapsule(
        given["capsule_id"], settings, events, rlimit=bool(given.get("rlimit")), meters=meters
    )
    server = await link.serve(SOCKET, AgentServicer(capsule, events, serialized_output=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if given.get("lifeline") is not None:
        _watch_lifeline(loop, int(given["lifeline"]))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await capsule.close()
        events.end()
        server.close()


def _not_dumpable() -> None:
    """The capsule's processes run as the supervisor's uid: they must not ptrace it, nor read its memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def main() -> None:
    """Entry point inside the sandbox."""
    _not_dumpable()
    malloc.tune()  # batches of output of a megabyte go through here
    logging.basicConfig(level=logging.WARNING, format="capsule supervisor: %(levelname)s %(message)s")
    asyncio.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()

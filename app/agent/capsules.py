"""The agent's capsules by id, each a workspace on disk with its own supervisor."""

from __future__ import annotations

import asyncio
import logging
import shutil

from app.agent.events import ProcessEvents
from app.agent.supervisor import Supervisor
from app.config import Settings
from app.datadir import DirectoryLock
from app.domain import ID_RE, CapsuleRuntime, CapsuleSpec, HostCapsule, check_id
from app.errors import NotFound

logger = logging.getLogger(__name__)


def check_capsule_id(capsule_id: str) -> str:
    """Returns the id when it is well formed, else raises InvalidRequest."""
    return check_id(capsule_id, what="capsule id")


class Capsules:
    """Creates, finds and destroys capsules; routes each call to the capsule's supervisor."""

    def __init__(self, settings: Settings, events: ProcessEvents) -> None:
        self._settings = settings
        self._events = events
        self._root = (settings.agent_dir / "capsules").resolve()
        self._supervisors: dict[str, Supervisor] = {}
        # What each capsule was created with; one adopted from disk takes the spec of its next create.
        self._specs: dict[str, CapsuleSpec] = {}
        self._lock = asyncio.Lock()  # create and destroy of one id must not interleave on disk

    def load(self, lock: DirectoryLock) -> None:
        """Adopts the capsule workspaces on disk and kills what the last agent left running in them.

        lock is this agent's hold on its directory: without it, the sweep could kill the processes
        of an agent that is alive and serving on the same data.
        """
        if not lock.is_held or lock.directory != self._settings.agent_dir.resolve():
            raise RuntimeError(f"loading capsules needs the lock on {self._settings.agent_dir}")
        self._root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self._root.iterdir()):
            if ID_RE.fullmatch(path.name) and (path / "workspace").is_dir():
                supervisor = self._supervisor_for(path.name)
                if killed := supervisor.sessions.sweep():
                    logger.warning(
                        "capsule %s: killed %d processes left by a previous agent", path.name, killed
                    )
                self._supervisors[path.name] = supervisor

    def _supervisor_for(self, capsule_id: str) -> Supervisor:
        workspace = self._root / capsule_id / "workspace"
        return Supervisor(capsule_id, workspace, self._settings, self._events.publish)

    def _info(self, supervisor: Supervisor) -> HostCapsule:
        spec = self._specs.get(supervisor.capsule_id, CapsuleSpec())
        return HostCapsule(
            capsule_id=supervisor.capsule_id,
            workspace=str(supervisor.workspace),
            running_processes=supervisor.running_count(),
            # The plain runtime isolates and measures nothing: network and limits are only reported.
            runtime=CapsuleRuntime.PLAIN,
            network=spec.network,
            limits=spec.limits,
            usage=None,
        )

    async def create(self, capsule_id: str, spec: CapsuleSpec | None = None) -> HostCapsule:
        """Makes the capsule's workspace; creating an existing capsule returns it."""
        check_capsule_id(capsule_id)
        async with self._lock:
            self._specs.setdefault(capsule_id, spec or CapsuleSpec())
            supervisor = self._supervisors.get(capsule_id)
            if supervisor is None:
                supervisor = self._supervisor_for(capsule_id)
                await asyncio.to_thread(supervisor.workspace.mkdir, mode=0o755, parents=True, exist_ok=True)
                self._supervisors[capsule_id] = supervisor
                logger.info("capsule %s: created", capsule_id)
        return self._info(supervisor)

    def supervisor(self, capsule_id: str) -> Supervisor:
        """The capsule's supervisor, or NotFound."""
        check_capsule_id(capsule_id)
        supervisor = self._supervisors.get(capsule_id)
        if supervisor is None:
            raise NotFound(f"no capsule {capsule_id} on this host")
        return supervisor

    def get(self, capsule_id: str) -> HostCapsule:
        """One capsule, or NotFound."""
        return self._info(self.supervisor(capsule_id))

    def list_capsules(self) -> list[HostCapsule]:
        """Every capsule of this agent, by id."""
        return [self._info(self._supervisors[key]) for key in sorted(self._supervisors)]

    async def destroy(self, capsule_id: str) -> None:
        """Kills every process group in the capsule and removes its directory."""
        async with self._lock:
            supervisor = self.supervisor(capsule_id)
            del self._supervisors[capsule_id]
            self._specs.pop(capsule_id, None)
            await supervisor.close()
            self._events.end(capsule_id)
            try:
                await asyncio.to_thread(shutil.rmtree, self._root / capsule_id)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("capsule %s: its directory could not be removed: %s", capsule_id, exc)
        logger.info("capsule %s: destroyed", capsule_id)

    async def close(self) -> None:
        """Kills the processes of every capsule; workspaces stay on disk."""
        supervisors = list(self._supervisors.values())
        self._supervisors.clear()
        self._specs.clear()
        await asyncio.gather(*(supervisor.close() for supervisor in supervisors))

"""The agent's capsules by id: each a directory on disk, run by a supervisor in the agent (plain) or
by one inside its own sandbox (sandbox)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from app.agent import inner
from app.agent.events import ProcessEvents
from app.agent.sandbox import UID_BASE, UID_COUNT, Sandbox, SandboxRuntime
from app.agent.supervisor import Supervisor
from app.agent.tally import CapsuleStat
from app.agent.uids import UidRegistry
from app.config import Settings
from app.datadir import DirectoryLock
from app.domain import ID_RE, CapsuleLimits, CapsuleRuntime, CapsuleSpec, HostCapsule, check_id
from app.errors import NotFound

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
# A sandbox's output counters are its supervisor's: while someone scrapes the agent's metrics (and
# COUNTERS_IDLE_SEC after), each live sandbox is asked for them every COUNTERS_EVERY_SEC, waiting
# COUNTERS_DEADLINE_SEC at most.
COUNTERS_EVERY_SEC = 1.0
COUNTERS_DEADLINE_SEC = 0.5
COUNTERS_IDLE_SEC = 300.0


def check_capsule_id(capsule_id: str) -> str:
    """Returns the id when it is well formed, else raises InvalidRequest."""
    return check_id(capsule_id, what="capsule id")


@dataclass
class _Capsule:
    """One capsule of this agent: a supervisor here (plain), or a sandbox with one inside."""

    capsule_id: str
    spec: CapsuleSpec
    uid: int
    supervisor: Supervisor | None = None
    sandbox: Sandbox | None = None

    @property
    def is_alive(self) -> bool:
        return self.sandbox is None or self.sandbox.is_alive


class Capsules:
    """Creates, finds and destroys capsules; says where each call for a capsule goes."""

    def __init__(self, settings: Settings, events: ProcessEvents, runtime: SandboxRuntime | None) -> None:
        self._settings = settings
        self._events = events
        self._runtime = runtime
        self._root = (settings.agent_dir / "capsules").resolve()
        self._spares = (settings.agent_dir / "spares").resolve()
        self._capsules: dict[str, _Capsule] = {}
        self._lock = asyncio.Lock()  # create and destroy must not interleave on disk
        # Sandboxes started ahead, oldest first, so that creating a capsule costs a rename, not a
        # sandbox's start; one starts at a time, in the background, until there are enough.
        self._pool: list[tuple[asyncio.Task[_Spare], int]] = []
        self._closed = False
        self._adopting: set[int] = set()
        self._uids = UidRegistry(UID_BASE, UID_COUNT - 1)
        # The sandboxes' output counters, asked for in the background (count_output).
        self._counter: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scraped = asyncio.Event()
        self._scraped_at = 0.0

    def stats(self) -> list[CapsuleStat]:
        """Each capsule's id, running processes and output counters, without waiting on anything: a
        sandbox's are what it last told (None before it has), and the scrape asks it for newer ones.
        Called from any thread (the metrics server's own)."""
        self._scraped_at = time.monotonic()
        if self._loop is not None and not self._scraped.is_set():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to wake
                self._loop.call_soon_threadsafe(self._scraped.set)
        stats: list[CapsuleStat] = []
        for c in list(self._capsules.values()):
            if c.sandbox is not None:
                stats.append(CapsuleStat(c.capsule_id, len(c.sandbox.running), c.sandbox.output))
            elif c.supervisor is not None:
                stats.append(
                    CapsuleStat(c.capsule_id, c.supervisor.running_count(), c.supervisor.output_counts())
                )
        return stats

    def count_output(self) -> None:
        """Keeps the sandboxes' output counters current while the agent's metrics are scraped
        (sandbox runtime; a plain capsule's are read at the scrape itself)."""
        if self._runtime is None or self._counter is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._counter = asyncio.create_task(self._count_output(), name="output-counters")

    async def _count_output(self) -> None:
        while True:
            await self._scraped.wait()  # idle until a scrape
            while time.monotonic() - self._scraped_at < COUNTERS_IDLE_SEC:
                sandboxes = [c.sandbox for c in list(self._capsules.values()) if c.sandbox is not None]
                results = await asyncio.gather(
                    *(s.refresh_output(COUNTERS_DEADLINE_SEC) for s in sandboxes), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, Exception):
                        logger.debug("output counters not refreshed: %r", result)
                await asyncio.sleep(COUNTERS_EVERY_SEC)
            self._scraped.clear()

    @property
    def runtime(self) -> CapsuleRuntime:
        """Where this agent runs its capsules' processes."""
        return CapsuleRuntime.PLAIN if self._runtime is None else CapsuleRuntime.SANDBOX

    def load(self, lock: DirectoryLock) -> list[str]:
        """Adopts the capsules on disk and kills what the last agent left running in them.

        Returns the sandboxed ones, to be started again by resume(). lock is this agent's hold on its
        directory: without it, the sweep could kill the processes of an agent alive on the same data.
        """
        if not lock.is_held or lock.directory != self._settings.agent_dir.resolve():
            raise RuntimeError(f"loading capsules needs the lock on {self._settings.agent_dir}")
        self._root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._spares, ignore_errors=True)  # a killed agent's spare ended with it
        if self._runtime is not None and (cleared := self._runtime.cgroups.clear()):
            logger.info("removed %d cgroups that an agent killed on this data directory left", cleared)
        waiting = []
        for path in sorted(self._root.iterdir()):
            if not (ID_RE.fullmatch(path.name) and (path / "workspace").is_dir()):
                continue
            spec, uid = _read_spec(path)
            if self._runtime is not None:
                if not (uid and self._uids.claim(uid)):  # another agent here holds it now
                    uid = self._free_uid()
                    _give(path, uid)
                    _write_spec(path, spec, uid)
                self._capsules[path.name] = _Capsule(path.name, spec, uid)
                waiting.append(path.name)
                continue
            supervisor = self._supervisor_for(path.name)
            if killed := supervisor.sessions.sweep():
                logger.warning("capsule %s: killed %d processes left by a previous agent", path.name, killed)
            self._capsules[path.name] = _Capsule(path.name, spec, uid, supervisor=supervisor)
        return waiting

    async def resume(self, capsule_ids: list[str]) -> None:
        """Starts the sandboxes of capsules adopted from disk (their processes ended with the last agent)."""
        for capsule_id in capsule_ids:
            capsule = self._capsules[capsule_id]
            try:
                capsule.sandbox = await self._launch(capsule)
            except Exception:
                logger.exception("capsule %s: its sandbox did not start again", capsule_id)
                del self._capsules[capsule_id]

    def _supervisor_for(self, capsule_id: str) -> Supervisor:
        workspace = self._root / capsule_id / "workspace"
        return Supervisor(capsule_id, workspace, self._settings, self._events.publish)

    def _free_uid(self) -> int:
        """A uid for a new sandbox that no capsule of any agent on this host has; the uids of
        capsules and spares gone meanwhile are let go first."""
        used = {c.uid for c in self._capsules.values()} | {uid for _, uid in self._pool} | self._adopting
        self._uids.retain(used)
        return self._uids.take(exclude=used)

    async def _launch(self, capsule: _Capsule) -> Sandbox:
        assert self._runtime is not None
        return await self._runtime.launch(
            capsule_id=capsule.capsule_id,
            capsule_dir=self._root / capsule.capsule_id,
            uid=capsule.uid,
            spec=capsule.spec,
            publish=self._events.publish,
        )

    def _info(self, capsule: _Capsule) -> HostCapsule:
        if capsule.sandbox is not None:
            return HostCapsule(
                capsule_id=capsule.capsule_id,
                workspace=str(inner.WORKSPACE),  # as its processes see it
                running_processes=len(capsule.sandbox.running),
                runtime=CapsuleRuntime.SANDBOX,
                network=capsule.spec.network,
                limits=capsule.spec.limits,
                usage=capsule.sandbox.usage_now(),
            )
        assert capsule.supervisor is not None
        return HostCapsule(
            capsule_id=capsule.capsule_id,
            workspace=str(capsule.supervisor.workspace),
            running_processes=capsule.supervisor.running_count(),
            # The plain runtime isolates and measures nothing: network and limits are only reported.
            runtime=CapsuleRuntime.PLAIN,
            network=capsule.spec.network,
            limits=capsule.spec.limits,
            usage=None,
        )

    async def create(self, capsule_id: str, spec: CapsuleSpec | None = None) -> HostCapsule:
        """Makes the capsule and starts what runs it; creating an existing capsule returns it."""
        check_capsule_id(capsule_id)
        async with self._lock:
            capsule = self._capsules.get(capsule_id)
            if capsule is not None and capsule.is_alive:
                return self._info(capsule)
            if capsule is not None:  # its sandbox ended: a sandbox of its own again
                capsule.sandbox = await self._launch(capsule)
            elif self._runtime is None:
                capsule = _Capsule(capsule_id, self._with_defaults(spec or CapsuleSpec()), 0)
                await asyncio.to_thread(_write_spec, self._root / capsule_id, capsule.spec, 0)
                capsule.supervisor = self._supervisor_for(capsule_id)
            else:
                capsule = _Capsule(capsule_id, self._with_defaults(spec or CapsuleSpec()), 0)
                capsule.sandbox = await self._take_spare(capsule)
                if capsule.sandbox is None:
                    capsule.uid = self._free_uid()
                    await asyncio.to_thread(_write_spec, self._root / capsule_id, capsule.spec, capsule.uid)
                    capsule.sandbox = await self._launch(capsule)
            self._capsules[capsule_id] = capsule
            logger.info("capsule %s: created (%s)", capsule_id, self.runtime.value.lower())
            return self._info(capsule)

    def prepare_spare(self) -> None:
        """Starts a spare sandbox in the background, where fewer than CAPSULE_SANDBOX_SPARES are ready
        or starting and none is starting (sandbox runtime only)."""
        if self._runtime is None or self._closed or len(self._pool) >= self._settings.sandbox_spares:
            return
        if any(not task.done() for task, _ in self._pool):
            return
        uid = self._free_uid()
        task = asyncio.create_task(self._launch_spare(uid), name="spare-sandbox")
        task.add_done_callback(self._spare_done)
        self._pool.append((task, uid))

    def _spare_done(self, task: asyncio.Task[_Spare]) -> None:
        # The next one, unless this one failed: a failure is retried by the next create, not in a loop.
        if not task.cancelled() and task.exception() is None:
            self.prepare_spare()

    async def _launch_spare(self, uid: int) -> _Spare:
        assert self._runtime is not None
        name = f"{inner.SPARE_PREFIX}{secrets.token_hex(6)}"
        directory = self._spares / name
        await asyncio.to_thread((directory / "workspace").mkdir, parents=True)
        spec = self._with_defaults(CapsuleSpec())
        sandbox = await self._runtime.launch(
            capsule_id=name, capsule_dir=directory, uid=uid, spec=spec, publish=self._events.publish
        )
        return _Spare(directory=directory, uid=uid, sandbox=sandbox)

    async def _take_spare(self, capsule: _Capsule) -> Sandbox | None:
        """A spare sandbox, made the capsule's, where it fits (no network); else None."""
        if capsule.spec.network or not self._pool:
            self.prepare_spare()
            return None
        # A ready one, else the one starting: it is ready sooner than a sandbox started now.
        index = next((i for i, (task, _) in enumerate(self._pool) if task.done()), 0)
        spare_task, uid = self._pool.pop(index)
        self._adopting.add(uid)  # taken before the next spare's uid is chosen
        try:
            await asyncio.wait({spare_task})
            try:
                spare = spare_task.result()
            except Exception:
                logger.exception("a spare sandbox did not start")
                return None
            finally:
                self.prepare_spare()
            capsule.uid = spare.uid
            try:
                directory = self._root / capsule.capsule_id
                await asyncio.to_thread(_adopt_dir, spare.directory, directory)
                await spare.sandbox.adopt(capsule.capsule_id, capsule.spec, run_dir=directory / "run")
                await asyncio.to_thread(_write_spec, directory, capsule.spec, spare.uid)
            except BaseException:
                await spare.sandbox.stop()
                raise
        finally:
            self._adopting.discard(uid)
        return spare.sandbox

    def _with_defaults(self, spec: CapsuleSpec) -> CapsuleSpec:
        """The spec with this agent's default process limit where the caller gave none (0)."""
        if spec.limits.max_processes:
            return spec
        limits = replace(spec.limits, max_processes=self._settings.capsule_max_processes)
        return replace(spec, limits=limits)

    def _find(self, capsule_id: str) -> _Capsule:
        check_capsule_id(capsule_id)
        capsule = self._capsules.get(capsule_id)
        if capsule is None:
            raise NotFound(f"no capsule {capsule_id} on this host")
        return capsule

    def sandbox(self, capsule_id: str) -> Sandbox | None:
        """The capsule's sandbox, where calls for it go; None for a plain capsule; NotFound if unknown."""
        return self._find(capsule_id).sandbox

    def supervisor(self, capsule_id: str) -> Supervisor:
        """The supervisor of a plain capsule, or NotFound."""
        supervisor = self._find(capsule_id).supervisor
        if supervisor is None:
            raise NotFound(f"no capsule {capsule_id} runs in this agent itself")
        return supervisor

    def get(self, capsule_id: str) -> HostCapsule:
        """One capsule, or NotFound (a sandbox that has ended holds nothing any more)."""
        capsule = self._find(capsule_id)
        if not capsule.is_alive:
            raise NotFound(f"capsule {capsule_id} has ended on this host: its sandbox stopped")
        return self._info(capsule)

    def list_capsules(self) -> list[HostCapsule]:
        """Every live capsule of this agent, by id."""
        return [self._info(c) for key, c in sorted(self._capsules.items()) if c.is_alive]

    async def destroy(self, capsule_id: str) -> None:
        """Ends everything in the capsule and removes its directory."""
        async with self._lock:
            capsule = self._find(capsule_id)
            del self._capsules[capsule_id]
            await _end(capsule)
            self._events.end(capsule_id)
            try:
                await asyncio.to_thread(shutil.rmtree, self._root / capsule_id)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("capsule %s: its directory could not be removed: %s", capsule_id, exc)
        logger.info("capsule %s: destroyed", capsule_id)

    async def close(self) -> None:
        """Ends everything in every capsule; their directories stay on disk, the spare's goes."""
        if self._counter is not None:
            self._counter.cancel()
            await asyncio.gather(self._counter, return_exceptions=True)
        capsules = list(self._capsules.values())
        self._capsules.clear()
        await asyncio.gather(*(_end(capsule) for capsule in capsules), self._drop_spare())
        self._uids.close()

    async def _drop_spare(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, []
        if not pool:
            return
        for task, _ in pool:
            task.cancel()
        done = await asyncio.gather(*(task for task, _ in pool), return_exceptions=True)
        await asyncio.gather(*(spare.sandbox.stop() for spare in done if isinstance(spare, _Spare)))
        await asyncio.to_thread(shutil.rmtree, self._spares, True)


@dataclass(frozen=True, slots=True)
class _Spare:
    """A sandbox started ahead of any capsule, in a directory of its own."""

    directory: Path
    uid: int
    sandbox: Sandbox


def _adopt_dir(spare: Path, directory: Path) -> None:
    # The sandbox's binds follow the directory: they hold it, not its name.
    directory.parent.mkdir(parents=True, exist_ok=True)
    spare.rename(directory)


async def _end(capsule: _Capsule) -> None:
    if capsule.sandbox is not None:
        await capsule.sandbox.stop()
    if capsule.supervisor is not None:
        await capsule.supervisor.close()


def _give(directory: Path, uid: int) -> None:
    """Makes the capsule's directories and all in them the new uid's."""
    for path in (directory / "workspace", directory / "run"):
        if not path.exists():
            continue
        os.chown(path, uid, uid, follow_symlinks=False)
        for parent, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.chown(os.path.join(parent, name), uid, uid, follow_symlinks=False)


def _write_spec(directory: Path, spec: CapsuleSpec, uid: int) -> None:
    """Keeps what the capsule was created with beside its workspace, for the next agent."""
    (directory / "workspace").mkdir(mode=0o755, parents=True, exist_ok=True)
    limits = spec.limits
    data = {
        "network": spec.network,
        "limits": {
            "max_processes": limits.max_processes,
            "memory_mib": limits.memory_mib,
            "cpus": limits.cpus,
        },
        "uid": uid,
    }
    (directory / SPEC_FILE).write_text(json.dumps(data))


def _read_spec(directory: Path) -> tuple[CapsuleSpec, int]:
    """What the capsule was created with, and its uid (0: none yet); defaults for an older capsule."""
    try:
        data = json.loads((directory / SPEC_FILE).read_text())
        limits = data["limits"]
        spec = CapsuleSpec(
            network=bool(data["network"]),
            limits=CapsuleLimits(
                max_processes=int(limits["max_processes"]),
                memory_mib=None if limits["memory_mib"] is None else int(limits["memory_mib"]),
                cpus=None if limits["cpus"] is None else float(limits["cpus"]),
            ),
        )
        return spec, int(data.get("uid") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return CapsuleSpec(), 0

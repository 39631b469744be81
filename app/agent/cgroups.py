"""A cgroup per capsule: its limits (processes, memory, CPU), its usage, and killing all it holds.

The host's cgroup v1 controllers (pids, memory, cpu, cpuacct, each mounted apart) or the unified
cgroup v2 hierarchy, whichever it has. Every process of a sandbox, from its launcher on, joins the
capsule's cgroup before it can fork, so nothing in the capsule escapes its limits or its end.

Where the host has no cgroups to give, the fallback is the capsule's own host uid: every process of
the capsule runs as it and as nobody else, so RLIMIT_NPROC, which the supervisor sets on itself,
bounds the capsule's processes and threads (the kernel counts them per uid and user namespace), and
killing every process of that uid ends the capsule. Memory and CPU then go unlimited and unmeasured.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.domain import CapsuleLimits, ResourceUsage

logger = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PARENT = "capsule"  # every capsule's cgroup lives below <controller>/capsule/<agent scope>/
V1_CONTROLLERS = ("pids", "memory", "cpu", "cpuacct")
# Those whose capsule cgroup the sandbox's supervisor is given, to make a cgroup per process in (v1):
# what measures a process, where cpu keeps the capsule's quota over them all.
DELEGATED = ("memory", "pids", "cpuacct")
CPU_PERIOD_US = 100_000
# How long a kill goes on: a loaded host takes a while to end a few hundred processes.
KILL_DEADLINE_SEC = 10.0


def scope_of(agent_dir: Path) -> str:
    """The name of an agent's own cgroup below capsule/, from its data directory: two agents on one
    host never share a capsule's cgroup, whatever their capsules are called."""
    return hashlib.sha256(str(agent_dir.resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class CgroupHost:
    """How this host offers cgroups: v1 (a directory per controller) or v2 (one unified tree), and
    the agent's own part of it: <controller>/capsule/<scope>/<capsule id>."""

    version: int
    scope: str
    root: Path = ROOT

    @classmethod
    def detect(cls, scope: str, root: Path = ROOT) -> CgroupHost | None:
        """The host's cgroups where this process may make them (as root), else None."""
        if os.geteuid() != 0:
            return None
        if (root / "cgroup.controllers").exists():
            wanted = {"pids", "memory", "cpu"}
            if wanted <= set((root / "cgroup.controllers").read_text().split()):
                return cls(version=2, scope=scope, root=root)
            return None
        if all((root / name / "cgroup.procs").exists() for name in V1_CONTROLLERS):
            return cls(version=1, scope=scope, root=root)
        return None

    def missing(self) -> str:
        """What a sandbox needs of cgroups, said for a warning."""
        return "cgroups: run the agent as root on a host with the pids, memory and cpu controllers"

    def base(self, controller: str) -> Path:
        """The agent's own cgroup, where its capsules' are made (controller is ignored on v2)."""
        if self.version == 2:
            return self.root / PARENT / self.scope
        return self.root / controller / PARENT / self.scope

    def capsule(self, capsule_id: str, uid: int) -> CapsuleCgroup:
        """The cgroup of one capsule (made by create()); uid, the capsule's, plays no part in it."""
        if self.version == 2:
            return CapsuleCgroup(self, (self.base("") / capsule_id,))
        return CapsuleCgroup(self, tuple(self.base(name) / capsule_id for name in V1_CONTROLLERS))

    def prepare(self) -> None:
        """Makes the parent cgroups; on v2, lets the controllers reach the capsules below."""
        for path in self._parents():
            path.mkdir(parents=True, exist_ok=True)
        if self.version == 2:
            for parent in (self.root, self.root / PARENT, self.base("")):
                with contextlib.suppress(OSError):  # already on, or not ours to turn on
                    (parent / "cgroup.subtree_control").write_text("+pids +memory +cpu")

    def clear(self) -> int:
        """Ends and removes every cgroup of this agent's part: what an agent killed outright on the
        same data directory left (spares' included, whose names are never taken again). Only once
        the data directory is locked: no other agent has this part. Returns how many there were."""
        names: set[str] = set()
        for parent in self._parents():
            with contextlib.suppress(OSError):
                names.update(path.name for path in parent.iterdir() if path.is_dir())
        for name in names:
            cgroup = self.capsule(name, 0)
            cgroup.kill()
            cgroup.remove()
        return len(names)

    def _parents(self) -> list[Path]:
        if self.version == 2:
            return [self.base("")]
        return [self.base(name) for name in V1_CONTROLLERS]


@dataclass(frozen=True, slots=True)
class CapsuleCgroup:
    """One capsule's cgroup: a directory per v1 controller, or one v2 directory."""

    host: CgroupHost
    paths: tuple[Path, ...]

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """The files a process writes its pid to in order to join."""
        return tuple(path / "cgroup.procs" for path in self.paths)

    def create(self, limits: CapsuleLimits) -> None:
        """Makes the cgroup with its memory limit (the supervisor's few MiB are in it); processes and
        CPU are left free until limit() runs, so the sandbox starts at full speed."""
        for path in self.paths:
            path.mkdir(exist_ok=True)
        memory = None if limits.memory_mib is None else str(limits.memory_mib * 1024 * 1024)
        if self.host.version == 2:
            (self.paths[0] / "memory.max").write_text(memory or "max")
            (self.paths[0] / "pids.max").write_text("max")
            (self.paths[0] / "cpu.max").write_text(f"max {CPU_PERIOD_US}")
            return
        if memory is not None:
            self._v1("memory", "memory.limit_in_bytes").write_text(memory)
        self._v1("pids", "pids.max").write_text("max")
        self._v1("cpu", "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        self._v1("cpu", "cpu.cfs_quota_us").write_text("-1")

    def renamed(self, capsule_id: str, limits: CapsuleLimits, own_tasks: int) -> CapsuleCgroup:
        """The cgroup moved to capsule_id's name, with its processes and those limits (a spare's,
        taken by a capsule)."""
        new = self.host.capsule(capsule_id, 0)
        new.kill()  # what a killed agent's sandbox of this capsule left, if its cgroup outlived it
        new.remove()
        for before, after in zip(self.paths, new.paths, strict=True):
            before.rename(after)
        new.create(limits)
        new.limit(limits, own_tasks=own_tasks)
        return new

    def delegate(self, uid: int) -> None:
        """Gives the capsule's uid its cgroups of DELEGATED (v1): it may make cgroups below them, one
        per process, and move its own processes between them and back; the limits stay root's. On v2
        nothing is given (a cgroup with processes has no controllers below it): /proc measures."""
        for path in self.delegated().values():
            os.chown(path, uid, uid)
            os.chown(path / "cgroup.procs", uid, uid)

    def delegated(self) -> dict[str, Path]:
        """The cgroups delegate() gives the capsule, by controller: the sandbox binds each at
        /sys/fs/cgroup/<controller>."""
        if self.host.version == 2:
            return {}
        return {name: self.host.base(name) / self.paths[0].name for name in DELEGATED}

    def tasks(self) -> int:
        """The processes and threads in the cgroup now: what pids.max counts."""
        if self.host.version == 2:
            return int((self.paths[0] / "pids.current").read_text())
        return int(self._v1("pids", "pids.current").read_text())

    def limit(self, limits: CapsuleLimits, *, own_tasks: int) -> None:
        """Applies the process and CPU limits: maxProcesses beyond the own_tasks already there."""
        pids = str(limits.max_processes + own_tasks)
        quota = None if limits.cpus is None else str(max(1000, int(limits.cpus * CPU_PERIOD_US)))
        if self.host.version == 2:
            (self.paths[0] / "pids.max").write_text(pids)
            (self.paths[0] / "cpu.max").write_text(f"{quota or 'max'} {CPU_PERIOD_US}")
            return
        self._v1("pids", "pids.max").write_text(pids)
        self._v1("cpu", "cpu.cfs_quota_us").write_text(quota or "-1")

    def _v1(self, controller: str, name: str) -> Path:
        return self.host.base(controller) / self.paths[0].name / name

    def pids(self) -> list[int]:
        """The processes in the cgroup now, those in the cgroups below it (a process's own) included."""
        found: set[int] = set()
        for path in self.paths:
            for top, _, _ in os.walk(path):
                with contextlib.suppress(OSError):
                    found.update(int(line) for line in (Path(top) / "cgroup.procs").read_text().split())
        return sorted(found)

    def usage(self, *, own: int = 0) -> ResourceUsage:
        """CPU and memory so far, and the processes alive now less the sandbox's own."""
        processes = max(0, len(self.pids()) - own)
        if self.host.version == 2:
            path = self.paths[0]
            stat = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines())
            peak_file = path / "memory.peak"
            current = int((path / "memory.current").read_text())
            return ResourceUsage(
                cpu_sec=int(stat["usage_usec"]) / 1e6,
                memory_bytes=current,
                memory_peak_bytes=int(peak_file.read_text()) if peak_file.exists() else current,
                processes=processes,
            )
        return ResourceUsage(
            cpu_sec=int(self._v1("cpuacct", "cpuacct.usage").read_text()) / 1e9,
            memory_bytes=int(self._v1("memory", "memory.usage_in_bytes").read_text()),
            memory_peak_bytes=int(self._v1("memory", "memory.max_usage_in_bytes").read_text()),
            processes=processes,
        )

    def kill(self) -> None:
        """SIGKILLs everything in the cgroup, forks under way included, until it is empty."""
        if self.host.version == 2 and (self.paths[0] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.paths[0] / "cgroup.kill").write_text("1")
        _kill_until_gone(self.pids, f"cgroup {self.paths[0]}")

    def remove(self) -> None:
        """Removes the (empty) cgroup, those below it first; what cannot be removed yet is logged and left."""
        for path in self.paths:
            below = sorted((Path(top) for top, _, _ in os.walk(path)), key=lambda p: -len(p.parts))[:-1]
            for nested in below:
                with contextlib.suppress(OSError):
                    nested.rmdir()
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cgroup %s not removed: %s", path, exc)


@dataclass(frozen=True, slots=True)
class RlimitHost:
    """A host without cgroups to make: a capsule's limits are rlimits on its own host uid."""

    version: int = 0

    def capsule(self, capsule_id: str, uid: int) -> UidGroup:
        """The processes of one capsule: those of its uid."""
        return UidGroup(self, uid)

    def prepare(self) -> None:
        """Nothing to make."""

    def clear(self) -> int:
        """Nothing is left behind that the uids' own kill does not end."""
        return 0


@dataclass(frozen=True, slots=True)
class UidGroup:
    """One capsule's processes as its host uid gathers them, with CapsuleCgroup's surface."""

    host: RlimitHost
    uid: int

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """Nothing to join: the uid the sandbox drops to is what gathers its processes."""
        return ()

    def create(self, limits: CapsuleLimits) -> None:
        """Nothing to make."""

    def renamed(self, capsule_id: str, limits: CapsuleLimits, own_tasks: int) -> UidGroup:
        """The same uid: a spare's stays the capsule's, and its supervisor sets the limit."""
        return self

    def delegate(self, uid: int) -> None:
        """Nothing to give: /proc measures each process."""

    def delegated(self) -> dict[str, Path]:
        """No cgroups."""
        return {}

    def pids(self) -> list[int]:
        """The processes whose real uid is the capsule's."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                uid = os.stat(entry).st_uid
                status = (entry / "status").read_text()
            except OSError:
                continue
            if uid != self.uid:
                continue
            real = next((line.split()[1] for line in status.splitlines() if line.startswith("Uid:")), "")
            if real == str(self.uid):
                found.append(int(entry.name))
        return sorted(found)

    def tasks(self) -> int:
        """The processes and threads of the uid now: what RLIMIT_NPROC counts."""
        count = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                count += len(os.listdir(f"/proc/{pid}/task"))
        return count

    def limit(self, limits: CapsuleLimits, *, own_tasks: int) -> None:
        """Nothing from outside: the supervisor lowers its own RLIMIT_NPROC, soft and hard, before
        any process of the capsule runs (raising another uid's would take CAP_SYS_RESOURCE)."""

    def usage(self, *, own: int = 0) -> ResourceUsage | None:
        """Nothing measures a capsule without a cgroup."""
        return None

    def kill(self) -> None:
        """SIGKILLs every process of the uid until there is none."""
        _kill_until_gone(self.pids, f"uid {self.uid}")

    def remove(self) -> None:
        """Nothing to remove."""


def _kill_until_gone(pids: Callable[[], list[int]], what: str) -> None:
    """SIGKILLs what pids() lists, round after round (a process forking as it is killed leaves a
    child for the next), until it lists nothing and every process it listed has exited, or the
    deadline passes.

    A cgroup stops listing a process as soon as it starts to exit, before the kernel has taken its
    memory and made it a zombie; each is followed by a pidfd (which a reused pid cannot fool) until
    the kernel reports its exit, so what returns has ended them all.
    """
    deadline = time.monotonic() + KILL_DEADLINE_SEC
    pause = 0.001
    dying: dict[int, int] = {}
    try:
        while found := pids():
            if time.monotonic() > deadline:
                logger.warning(
                    "%s still holds %d processes after %.0f s of SIGKILL", what, len(found), KILL_DEADLINE_SEC
                )
                return
            for pid in found:
                _signal(dying, pid)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        _await_exits(list(dying.values()), deadline, what)
    finally:
        for fd in dying.values():
            os.close(fd)


def _signal(dying: dict[int, int], pid: int) -> None:
    """SIGKILLs pid through a pidfd kept in dying (opened on its first round)."""
    fd = dying.get(pid)
    if fd is None:
        try:
            fd = dying[pid] = os.pidfd_open(pid)
        except OSError:  # gone already
            return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, signal.SIGKILL)


def _await_exits(fds: list[int], deadline: float, what: str) -> None:
    """Waits until every pidfd in fds reports its process's exit, or the deadline passes."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    waiting = len(fds)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            logger.warning(
                "%s: %d killed processes had not exited after %.0f s", what, waiting, KILL_DEADLINE_SEC
            )
            return
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            waiting -= 1

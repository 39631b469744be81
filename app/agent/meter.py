"""What one background process and its children cost, and whether the kernel's OOM killer ended it.

Two ways to measure, chosen per supervisor:

- A cgroup per process (CgroupMeters), nested in the capsule's cgroup, where the supervisor can make
  them: the sandbox runtime on a cgroup v1 host, whose agent binds the capsule's memory, pids and
  cpuacct cgroups into the sandbox at /sys/fs/cgroup/<controller> and gives them to the capsule's
  uid. The supervisor joins the new cgroup itself for the instant of the fork and leaves it at once,
  so the child is born inside: nothing it forks, however early, escapes it. The kernel then counts
  CPU (cpuacct.usage), memory now and at its peak (memory.usage_in_bytes, memory.max_usage_in_bytes),
  the processes (cgroup.procs) and the OOM kills (memory.oom_control's oom_kill) of the process and
  all its descendants.
- /proc sums over the process's group otherwise (ProcMeters: the plain runtime, the rlimit mode and
  cgroup v2): CPU of the group's live members and of the children they reaped, their resident memory,
  the peak as sampled (at each ask and every SAMPLE_SEC: the members' summed RSS and their VmHWM),
  and at the exit the CPU wait4 counted for the leader and the children it reaped. An OOM kill is not
  told apart from a SIGKILL there (false).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.agent.child import Child
from app.domain import ResourceUsage

logger = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# The cgroup v1 controllers a process gets a cgroup of its own in (cpu keeps the capsule's quota).
CONTROLLERS = ("memory", "pids", "cpuacct")
# Where the sandbox sees its capsule's cgroups.
SANDBOX_CGROUPS = Path("/sys/fs/cgroup")
# How often /proc is read for the peaks of the runs it measures.
SAMPLE_SEC = 1.0
# A /proc scan serves the usage of every process asked about within this long after it (a list of many).
SCAN_TTL_SEC = 0.005
# How long an exit's final reading waits for the rest of its cgroup (killed with the leader) to go.
SETTLE_SEC = 1.0
SETTLE_ROUNDS = 100


class Meter(Protocol):
    """The usage of one run of a process."""

    def usage(self, *, at_start: bool = False) -> ResourceUsage | None:
        """What the run and its children use now; None where it cannot be read. at_start: the
        reading its start (or restart) answers with, the instant after the fork, when the run is its
        leader alone: a meter may then spare itself a costly read."""

    async def finish(
        self, rusage: resource.struct_rusage | None, code: int
    ) -> tuple[ResourceUsage | None, bool]:
        """The run's final totals once its leader is reaped (code: -N for signal N), and whether
        the kernel's OOM killer ended it."""


class Meters(Protocol):
    """Gives each run a meter."""

    def spawn(self, spawn: Callable[[], Child]) -> Child:
        """Runs spawn (which forks the run), and returns its Child with the meter set, measured from birth."""


def _cpu_of(rusage: resource.struct_rusage | None) -> float:
    return 0.0 if rusage is None else rusage.ru_utime + rusage.ru_stime


@dataclass(frozen=True, slots=True)
class _Stat:
    pgrp: int
    alive: bool  # not a zombie
    cpu_ticks: int  # its own and its reaped children's user and system time
    rss_pages: int


def _stat(path: str) -> _Stat | None:
    """The fields this needs of one /proc/PID/stat; None once the process is gone."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError:  # ended while we looked
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    # After the command: state, ppid, pgrp, ... utime (11), stime, cutime, cstime, ... rss (21).
    return _Stat(
        pgrp=int(fields[2]),
        alive=fields[0] not in (b"Z", b"X"),
        cpu_ticks=sum(int(f) for f in fields[11:15]),
        rss_pages=int(fields[21]),
    )


def _scan(proc: Path = Path("/proc")) -> dict[int, _Stat]:
    """Every process's /proc/PID/stat fields this needs, by pid."""
    found: dict[int, _Stat] = {}
    with os.scandir(proc) as entries:
        for entry in entries:
            if entry.name.isdigit() and (stat := _stat(f"{entry.path}/stat")) is not None:
                found[int(entry.name)] = stat
    return found


def _high_water(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class ProcMeters:
    """Meters that sum /proc over each process's group; one scan of /proc serves a burst of asks."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self._scanned_at = -1.0
        self._table: dict[int, _Stat] = {}
        self._live: set[ProcMeter] = set()
        self._sampler: asyncio.TimerHandle | None = None

    def spawn(self, spawn: Callable[[], Child]) -> Child:
        """Runs spawn; the meter follows the new process's group (its pid: it leads a new session)."""
        child = spawn()
        meter = ProcMeter(self, child.pid)
        child.meter = meter
        meter.first_peak()
        self._live.add(meter)
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().call_later(SAMPLE_SEC, self._sample)
        return child

    def ended(self, meter: ProcMeter) -> None:
        """The meter's run has ended: no more samples of it."""
        self._live.discard(meter)

    def _sample(self) -> None:
        """Every SAMPLE_SEC while runs are measured: one scan, each run's peak brought up to date
        (nothing else keeps a peak where no cgroup counts it)."""
        self._sampler = None
        for meter in list(self._live):
            meter.usage()
        if self._live:
            self._sampler = asyncio.get_running_loop().call_later(SAMPLE_SEC, self._sample)

    def table(self, newer_than: float) -> dict[int, _Stat]:
        """/proc as read after newer_than (monotonic), and at most SCAN_TTL_SEC ago."""
        now = time.monotonic()
        if self._scanned_at <= newer_than or now - self._scanned_at > SCAN_TTL_SEC:
            self._table = _scan(self.proc)
            self._scanned_at = time.monotonic()
        return self._table


class ProcMeter:
    """One run's usage as /proc tells it: the sum over the live members of its process group."""

    def __init__(self, meters: ProcMeters, pgid: int) -> None:
        self._meters = meters
        self._pgid = pgid
        self._born = time.monotonic()
        self._cpu = 0.0
        self._peak = 0

    def first_peak(self) -> None:
        """The leader's high-water mark as it starts, from its own status file alone: a scan of all
        of /proc for each spawn would cost more than the spawn (its group holds just the leader yet)."""
        self._peak = max(self._peak, _high_water(self._pgid))

    def usage(self, *, at_start: bool = False) -> ResourceUsage | None:
        """Reads /proc (or the scan of a moment ago); at the start, the leader's own stat alone
        (every start answers with its usage, and a scan of all of /proc for each would cost more than
        the spawn, growing with the host's processes)."""
        try:
            if at_start:
                stat = _stat(f"{self._meters.proc}/{self._pgid}/stat")
                table = {} if stat is None else {self._pgid: stat}
            else:
                table = self._meters.table(self._born)
        except OSError:
            return None
        members = [(pid, stat) for pid, stat in table.items() if stat.pgrp == self._pgid]
        alive = [pid for pid, stat in members if stat.alive]
        memory = sum(stat.rss_pages for _, stat in members if stat.alive) * PAGE_BYTES
        self._cpu = max(self._cpu, sum(stat.cpu_ticks for _, stat in members) / CLOCK_TICKS)
        self._peak = max(self._peak, memory, *(_high_water(pid) for pid in alive))
        return ResourceUsage(
            cpu_sec=self._cpu, memory_bytes=memory, memory_peak_bytes=self._peak, processes=len(alive)
        )

    async def finish(
        self, rusage: resource.struct_rusage | None, code: int
    ) -> tuple[ResourceUsage | None, bool]:
        """The CPU wait4 counted for the leader and the children it reaped (or the most seen), and the
        peak as sampled: wait4's ru_maxrss is no measure, as it holds the supervisor's own size at
        the fork."""
        self._meters.ended(self)
        final = ResourceUsage(
            cpu_sec=max(self._cpu, _cpu_of(rusage)),
            memory_bytes=0,
            memory_peak_bytes=self._peak,
            processes=0,
        )
        return final, False


class CgroupMeters:
    """A cgroup v1 per process in each of CONTROLLERS below root (the capsule's cgroups, as the
    sandbox sees them); /proc sums for a spawn whose cgroup cannot be made."""

    def __init__(self, root: Path = SANDBOX_CGROUPS) -> None:
        self._root = root
        self._names = itertools.count(1)
        self._fallback = ProcMeters()
        self._warned = False

    @classmethod
    def usable(cls, root: Path = SANDBOX_CGROUPS) -> bool:
        """True where every controller's cgroup is there for this process to make cgroups in."""
        return all(os.access(root / name, os.W_OK) for name in CONTROLLERS)

    def spawn(self, spawn: Callable[[], Child]) -> Child:
        """Makes the run's cgroups, moves this process into them for the fork, and back."""
        name = f"run-{next(self._names)}"
        dirs: dict[str, Path] = {}
        try:
            for controller in CONTROLLERS:
                path = self._root / controller / name
                path.mkdir()
                dirs[controller] = path
            for path in dirs.values():
                (path / "cgroup.procs").write_text("0")  # 0: the writer, all its threads
        except OSError as exc:
            self._home()
            _remove(dirs.values())
            if not self._warned:
                logger.warning("no cgroup per process (%s): usage comes from /proc", exc)
                self._warned = True
            return self._fallback.spawn(spawn)
        try:
            child = spawn()
        except BaseException:
            self._home()
            _remove(dirs.values())
            raise
        self._home()
        child.meter = CgroupMeter(dirs, child.pid)
        return child

    def _home(self) -> None:
        """Back to the capsule's own cgroups, where the supervisor lives."""
        for controller in CONTROLLERS:
            try:
                (self._root / controller / "cgroup.procs").write_text("0")
            except OSError as exc:
                logger.error("the supervisor could not go back to its %s cgroup: %s", controller, exc)


class CgroupMeter:
    """One run's usage as its cgroups count it."""

    def __init__(self, dirs: dict[str, Path], pgid: int) -> None:
        self._dirs = dirs
        self._pgid = pgid  # the leader's group, SIGKILLed when the leader exits

    def _read(self, controller: str, name: str) -> int:
        return int((self._dirs[controller] / name).read_text())

    def _pids(self) -> list[int]:
        found: list[int] = []
        for top, _, _ in os.walk(self._dirs["pids"]):
            with contextlib.suppress(OSError, ValueError):
                found += [int(pid) for pid in (Path(top) / "cgroup.procs").read_text().split()]
        return found

    def _processes(self) -> int:
        return len(self._pids())

    def _dying(self) -> bool:
        """True while a process of the leader's group, killed with it, is still in the cgroup (one
        that left the group, a setsid one, is not waited for: it may run on)."""
        for pid in self._pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as file:
                    raw = file.read()
            except OSError:
                continue
            if int(raw[raw.rfind(b")") + 2 :].split()[2]) == self._pgid:
                return True
        return False

    def usage(self, *, at_start: bool = False) -> ResourceUsage | None:
        """A few small reads of the kernel's own files (as cheap at the start as later)."""
        try:
            processes = self._processes()
            return ResourceUsage(
                cpu_sec=self._read("cpuacct", "cpuacct.usage") / 1e9,
                memory_bytes=self._read("memory", "memory.usage_in_bytes") if processes else 0,
                memory_peak_bytes=self._read("memory", "memory.max_usage_in_bytes"),
                processes=processes,
            )
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes of the run the kernel's OOM killer ended."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self._dirs["memory"] / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    async def finish(
        self, rusage: resource.struct_rusage | None, code: int
    ) -> tuple[ResourceUsage | None, bool]:
        """The totals once what was killed with the leader is gone, then the cgroups removed.

        OOM-killed: the leader ended by SIGKILL and the kernel counted an OOM kill in the run."""
        for _ in range(SETTLE_ROUNDS):  # the kernel's files tell no one when they change: look again
            if not self._dying():
                break
            await asyncio.sleep(SETTLE_SEC / SETTLE_ROUNDS)
        oom = code == -signal.SIGKILL and self.oom_kills() > 0
        usage = self.usage()
        if usage is not None:
            usage = ResourceUsage(
                cpu_sec=max(usage.cpu_sec, _cpu_of(rusage)),
                memory_bytes=usage.memory_bytes,
                memory_peak_bytes=usage.memory_peak_bytes,
                processes=usage.processes,
            )
        if usage is None or not usage.processes:
            _remove(self._dirs.values())
        return usage, oom


def _remove(paths: Iterable[Path]) -> None:
    """Removes empty cgroups, nested ones first; one still holding a process stays (the capsule's
    removal takes it)."""
    for path in paths:
        for top, _, _ in sorted(os.walk(path), key=lambda walked: -len(walked[0])):
            with contextlib.suppress(OSError):
                os.rmdir(top)

"""The sessions a capsule's processes run in, kept on disk so a restarted agent can end what it left.

The plain runtime cannot take a capsule's processes down with an agent that is killed outright:
they are session leaders of their own. Each capsule keeps a small file of its live sessions (leader
pid and the leader's start time); the next agent to adopt the capsule kills every process left in them.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PROC = Path("/proc")
# Appended lines past the live sessions (twice over) before the journal is rewritten.
COMPACT_LINES = 256
TICKS_PER_SEC = os.sysconf("SC_CLK_TCK")

# When a session leader started, in clock ticks since boot (field 22 of /proc/PID/stat): the first
# and last tick it may have started in.
Born = tuple[int, int]


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat gives a process's start time in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * TICKS_PER_SEC)


def _stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time in clock ticks) of a live process, or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[3]), int(fields[19])


def session_members(session: int) -> list[int]:
    """The live processes of a session."""
    members = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] == session:
            members.append(int(entry.name))
    return members


class Sessions:
    """The live sessions of one capsule, journalled to a file beside its workspace.

    add and remove stay on the event loop, in the spawn and reap paths, on purpose: the session must
    be on disk before start() answers, or an agent killed just after could leave one unrecorded, and
    a synchronous write gives that order for free. They are cheap (1000 rounds on this project's
    machines, ext4, under load): the /proc read ~20 us, an add and a remove together ~50-75 us,
    against ~500-700 us for the fork and exec just before on the same loop; a thread hop alone costs
    ~60 us. Rewriting the whole file each time, as the first version did, cost 150-470 us a pair: a
    truncated non-empty file makes ext4 start writeback (auto_da_alloc). So lines are appended
    ("+pid start", "-pid"), and the file is rewritten only once it holds many more lines than live
    sessions, through a rename, so a kill mid-rewrite leaves the old journal whole.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._live: dict[int, Born] = {}
        self._lines = 0  # lines in the journal since it was last rewritten

    def add(self, pid: int, spawned_after: int) -> None:
        """Remembers a session whose leader has just been spawned, at boot_ticks() spawned_after or later.

        The leader's start time is known without reading it: the kernel took it between then and now.
        A read of /proc/PID/stat costs 50 us, and up to 500 us while a short command is exiting.
        """
        born = (spawned_after, boot_ticks())
        self._live[pid] = born
        self._append(f"+{pid} {born[0]} {born[1]}\n")

    def remove(self, pid: int) -> None:
        """Forgets a session whose processes are all gone."""
        if self._live.pop(pid, None) is not None:
            self._append(f"-{pid}\n")

    def _append(self, line: str) -> None:
        self._lines += 1
        if self._lines > COMPACT_LINES + 2 * len(self._live):
            self._rewrite()
            return
        try:
            with self._path.open("a") as journal:
                journal.write(line)
        except OSError as exc:  # the workspace is being removed; nothing is left to protect
            logger.debug("cannot write %s: %s", self._path, exc)

    def _rewrite(self) -> None:
        self._lines = len(self._live)
        staged = self._path.with_name(self._path.name + ".new")
        try:
            staged.write_text("".join(f"+{pid} {lo} {hi}\n" for pid, (lo, hi) in self._live.items()))
            os.replace(staged, self._path)
        except OSError as exc:
            logger.debug("cannot write %s: %s", self._path, exc)

    def _recorded(self) -> dict[int, Born]:
        """The sessions the journal holds: leader pid to when the leader started."""
        try:
            lines = self._path.read_text().splitlines()
        except OSError:
            return {}
        recorded: dict[int, Born] = {}
        for line in lines:
            try:
                if line.startswith("-"):
                    recorded.pop(int(line[1:]), None)
                    continue
                # "+pid first last"; earlier agents wrote the exact start, as "+pid start" or "pid start"
                pid, *born = (int(part) for part in line.removeprefix("+").split())
            except ValueError:  # a line cut short when its agent was killed mid-write
                continue
            if len(born) in (1, 2):
                recorded[pid] = (born[0], born[-1])
        return recorded

    def sweep(self) -> int:
        """Kills what a previous agent left running in this capsule's sessions; returns how many."""
        killed = 0
        for pid, (first, last) in self._recorded().items():
            leader = _stat(pid)
            if leader is not None and not first <= leader[1] <= last:
                continue  # the pid now belongs to someone else, and so may a session of that id
            for member in session_members(pid):
                try:
                    os.kill(member, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        self._live.clear()
        self._rewrite()
        return killed

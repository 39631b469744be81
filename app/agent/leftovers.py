"""The sessions a capsule's processes run in, kept on disk so a restarted agent can end what it left.

The plain runtime cannot take a capsule's processes down with an agent that is killed outright:
they are session leaders of their own. Each capsule keeps a small file of its live sessions (leader
pid and the leader's start time); the next agent to adopt the capsule kills every process left in them.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

PROC = Path("/proc")


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
    """The live sessions of one capsule, mirrored to a file beside its workspace."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._live: dict[int, int] = {}

    def add(self, pid: int) -> None:
        """Remembers a session whose leader has just been spawned."""
        stat = _stat(pid)
        if stat is not None:
            self._live[pid] = stat[1]
            self._save()

    def remove(self, pid: int) -> None:
        """Forgets a session whose processes are all gone."""
        if self._live.pop(pid, None) is not None:
            self._save()

    def _save(self) -> None:
        try:
            self._path.write_text("".join(f"{pid} {start}\n" for pid, start in self._live.items()))
        except OSError as exc:  # the workspace is being removed; nothing is left to protect
            logger.debug("cannot write %s: %s", self._path, exc)

    def sweep(self) -> int:
        """Kills what a previous agent left running in this capsule's sessions; returns how many."""
        try:
            lines = self._path.read_text().splitlines()
        except OSError:
            return 0
        killed = 0
        for line in lines:
            pid, start = (int(part) for part in line.split())
            leader = _stat(pid)
            if leader is not None and leader[1] != start:
                continue  # the pid now belongs to someone else, and so may a session of that id
            for member in session_members(pid):
                try:
                    os.kill(member, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        self._live.clear()
        self._save()
        return killed

"""Host uids of sandboxed capsules, each held by one agent at a time across the whole host.

A capsule's processes run as a host uid of its own: the uid is what the kernel counts for
RLIMIT_NPROC, what owns the workspace, and, without cgroups, what a kill of the capsule ends. Two
agents on one host (a `capsule serve` beside a `capsule agent`, or the tests) must never hand out
the same uid, so each uid in use is an flock held on a file of its own in a directory of the host's.
The kernel lets go of an agent's locks when its process ends, however it ends: a file nobody holds
a lock on is a free uid.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from app.errors import RateLimited

DIRECTORY = Path("/run/capsule-agent/uids")


class UidRegistry:
    """The uids this agent holds, and the taking of more."""

    def __init__(self, first: int, count: int, directory: Path = DIRECTORY) -> None:
        self._first, self._count, self._directory = first, count, directory
        self._held: dict[int, int] = {}  # uid -> the descriptor holding its lock
        self._next = 0  # where take() looks first, from first on

    def claim(self, uid: int) -> bool:
        """Takes uid for this agent, unless another agent (or another registry here) holds it."""
        if uid in self._held:
            return True
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._directory / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[uid] = fd
        return True

    def take(self, exclude: Iterable[int] = ()) -> int:
        """A uid no agent on the host holds, now this one's; RateLimited when none is left.

        Round the range: a uid let go is taken again only once every other one has been, so a new
        capsule never starts under the uid of one destroyed a moment ago (where, without cgroups, a
        uid is what the kill of a capsule ends).
        """
        skip = set(exclude)
        for step in range(self._count):
            uid = self._first + (self._next + step) % self._count
            if uid not in skip and uid not in self._held and self.claim(uid):
                self._next = (uid - self._first + 1) % self._count
                return uid
        raise RateLimited("this host runs as many sandboxes as it has uids for them")

    def retain(self, keep: Iterable[int]) -> None:
        """Lets go of every uid held but those in keep (the capsules and spares still alive)."""
        wanted = set(keep)
        for uid in [u for u in self._held if u not in wanted]:
            os.close(self._held.pop(uid))

    def close(self) -> None:
        """Lets go of them all."""
        self.retain(())

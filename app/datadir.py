"""Locks on the directories a server or an agent owns, so a second start on the same data touches nothing.

`capsule serve` locks the data directory before it migrates or writes the dev key; every agent (alone
or inside `serve`) locks its own directory, `<data dir>/agent`, before it kills what a previous agent
left. Two files, because flock belongs to an open file description: the embedded agent locking the
server's file again would conflict with its own process. The kernel drops a lock when its holder dies,
so a killed process never leaves a stale one; the PID in the file only names the holder in the error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from app.config import Settings

LOCK_NAME = "lock"


class DirectoryInUse(Exception):
    """Another live process holds the lock on a directory this one needs."""

    def __init__(self, *, what: str, directory: Path, pid: int | None, holder: str) -> None:
        self.directory = directory
        self.pid = pid
        by = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"the {what} {directory} is in use by {by} ({holder}); "
            "stop it or set CAPSULE_DATA_DIR to another directory"
        )


class DirectoryLock:
    """An exclusive flock on `<directory>/lock`, which holds the holder's PID while it is held."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, *, what: str, holder: str) -> DirectoryLock:
        """Takes the lock at once, or raises DirectoryInUse naming the holder; never waits."""
        directory.mkdir(parents=True, exist_ok=True)
        directory = directory.resolve()
        # os.open makes the descriptor non-inheritable (PEP 446): a spawned process that outlives
        # its agent must not keep the lock, or no agent could ever start there again.
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DirectoryInUse(what=what, directory=directory, pid=pid, holder=holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)  # only the holder writes, so a reader sees its PID or, briefly, nothing
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    @property
    def is_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empties the file and lets the lock go; releasing twice is harmless."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor of the open file drops the flock

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):  # the holder is between truncating and writing
        return None


def lock_data_dir(settings: Settings) -> DirectoryLock:
    """The lock `capsule serve` holds on the data directory while it runs."""
    return DirectoryLock.acquire(settings.data_dir, what="data directory", holder="another capsule serve")


def lock_agent_dir(settings: Settings) -> DirectoryLock:
    """The lock an agent holds on its directory while it supervises the capsules in it."""
    return DirectoryLock.acquire(
        settings.agent_dir, what="agent directory", holder="a capsule agent, or the agent of a capsule serve"
    )

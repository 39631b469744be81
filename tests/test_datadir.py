"""The directory locks: one holder at a time, named in the error, gone with the holder."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings
from app.datadir import LOCK_NAME, DirectoryInUse, DirectoryLock, lock_agent_dir, lock_data_dir
from tests.system import is_alive

HOLD = (
    "import sys\n"
    "from pathlib import Path\n"
    "from app.datadir import DirectoryLock\n"
    "lock = DirectoryLock.acquire(Path(sys.argv[1]), what='data directory', holder='a test')\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with lock_data_dir(settings) as lock:
        assert lock.directory == settings.data_dir.resolve()
        assert (settings.data_dir / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        # flock belongs to the open file: even this process cannot take the lock twice.
        with pytest.raises(DirectoryInUse) as refused:
            lock_data_dir(settings)
        assert refused.value.pid == os.getpid()
        assert str(refused.value) == (
            f"the data directory {settings.data_dir.resolve()} is in use by process {os.getpid()} "
            "(another capsule serve); stop it or set CAPSULE_DATA_DIR to another directory"
        )
        # The embedded agent's lock is another file: a serve holds both.
        with lock_agent_dir(settings):
            pass
    assert not lock.is_held
    assert (settings.data_dir / LOCK_NAME).read_text() == ""
    with lock_data_dir(settings):  # released, it can be taken again
        pass


async def test_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(20):
            assert await asyncio.to_thread(holder.stdout.readline) == b"held\n"
        with pytest.raises(DirectoryInUse) as refused:
            DirectoryLock.acquire(tmp_path, what="data directory", holder="a test")
        assert refused.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    with DirectoryLock.acquire(tmp_path, what="data directory", holder="a test"):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # the stale PID is replaced


def test_a_spawned_process_does_not_keep_the_lock(tmp_path: Path) -> None:
    lock = DirectoryLock.acquire(tmp_path, what="agent directory", holder="a test")
    # close_fds=False passes every inheritable descriptor: the lock's must not be one of them,
    # or a process that outlives its agent would keep every later agent out.
    child = subprocess.Popen(["sleep", "1000"], close_fds=False, start_new_session=True)
    try:
        lock.release()
        assert is_alive(child.pid)
        with DirectoryLock.acquire(tmp_path, what="agent directory", holder="a test"):
            pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

"""How much a process's pipe or terminal holds, which each read of its output asks for."""

from __future__ import annotations

import os
import pty
import select
from pathlib import Path

from app.agent.child import _waiting


def test_a_pipe_says_what_it_holds_and_nothing_once_read_or_closed() -> None:
    read_fd, write_fd = os.pipe()
    try:
        assert _waiting(read_fd) == 0
        os.write(write_fd, b"x" * 12_345)
        assert _waiting(read_fd) == 12_345
        assert len(os.read(read_fd, 1 << 20)) == 12_345
        assert _waiting(read_fd) == 0
        os.close(write_fd)
        write_fd = -1
        assert _waiting(read_fd) == 0 and os.read(read_fd, 1) == b""  # the end: a read sees it
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_a_terminal_says_what_it_holds() -> None:
    leader, follower = pty.openpty()
    try:
        os.write(follower, b"hello\n")
        assert select.select([leader], [], [], 10)[0]  # as the agent reads: once it is readable
        assert _waiting(leader) > 0  # the line discipline may turn "\n" into "\r\n"
        assert os.read(leader, 1 << 20).startswith(b"hello")
    finally:
        os.close(leader)
        os.close(follower)


def test_a_descriptor_that_cannot_say_is_read_as_before(tmp_path: Path) -> None:
    directory = os.open(tmp_path, os.O_RDONLY)  # FIONREAD answers ENOTTY for it
    try:
        assert _waiting(directory) == 0  # the read that follows asks for its usual size
    finally:
        os.close(directory)

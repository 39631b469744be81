"""One spawned process group: pipes drained as they fill, exit seen through a pidfd, group reaped."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.domain import Stream, TerminalSize
from app.errors import InvalidRequest, InvalidState

if TYPE_CHECKING:
    from app.agent.meter import Meter

logger = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
# A read that fills its buffer means the pipe holds more: the next one asks for up to this much.
MAX_READ_BYTES = 1024 * 1024
# A bigger pipe lets a writer run ahead while the agent is busy elsewhere.
PIPE_BYTES = 1024 * 1024
# After the group is killed, a process that left the group may still hold a pipe open.
DRAIN_TIMEOUT_SEC = 2.0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

Sink = Callable[[Stream, bytes], None]


def _waiting(fd: int) -> int:
    """How many bytes a pipe or terminal holds for reading (FIONREAD); 0 when it cannot say."""
    try:
        (count,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))  # a C int
    except OSError:
        return 0
    return int(count)


def _pipe(*, grow: bool) -> tuple[int, int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    if grow:
        with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(read_fd, _F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


def _set_size(fd: int, size: TerminalSize) -> None:
    """TIOCSWINSZ: the kernel sends SIGWINCH to the terminal's foreground job when the size changes."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


def _take_terminal() -> None:  # pragma: no cover - runs in the child, between fork and exec
    # The child is a session leader already (start_new_session): its stdin, the pty's slave,
    # becomes its controlling terminal, so ^C, job control and SIGWINCH reach its foreground job.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _spawn_error(cmd: str, exc: OSError) -> InvalidRequest:
    if isinstance(exc, FileNotFoundError):
        return InvalidRequest(f"command {cmd!r} not found: give a path or a program on PATH")
    if isinstance(exc, PermissionError):
        return InvalidRequest(f"command {cmd!r} cannot be executed: permission denied")
    if exc.errno == errno.ENOEXEC:
        return InvalidRequest(f"command {cmd!r} is not an executable (no #! line or wrong format)")
    return InvalidRequest(f"command {cmd!r} cannot be executed: {exc.strerror or exc}")


def _ignore_quietly(signum: int, frame: object) -> None:
    """Stands in for SIG_IGN in this process, which its children would inherit."""


def _defaults_for_children() -> None:
    """Where this process was started with signals ignored (`cmd &` ignores SIGINT and SIGQUIT,
    nohup SIGHUP), a process it starts would inherit them as ignored, and a non-interactive shell may
    not even trap them: ^C on a terminal and signalProcess would do nothing. A handler that does
    nothing keeps them ignored here, and exec gives every child the default instead. SIGPIPE and
    SIGXFSZ are subprocess's own to restore; only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            continue
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(signum) is signal.SIG_IGN:
                signal.signal(signum, _ignore_quietly)


@functools.cache
def _defaults_once() -> None:
    """_defaults_for_children, once: the dispositions this process started with."""
    _defaults_for_children()


@contextlib.contextmanager
def _closed_on_failure(cmd: str, fds: list[int], *, terminal: bool = False) -> Iterator[None]:
    """Closes fds, what was opened for the child so far, when starting cmd fails, and says why it did."""
    try:
        yield
    except (OSError, subprocess.SubprocessError) as exc:
        for fd in fds:
            os.close(fd)
        if isinstance(exc, OSError):
            raise _spawn_error(cmd, exc) from exc
        if terminal:  # from the preexec_fn: TIOCSCTTY failed in the child
            raise InvalidRequest(f"command {cmd!r} cannot get a terminal: {exc}") from exc
        raise


def _popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    stdin: int,
    stdout: int,
    stderr: int,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """argv (no shell) as the leader of a new session, given only stdin, stdout and stderr."""
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=dict(env),
        close_fds=True,
        start_new_session=True,
        preexec_fn=preexec_fn,  # noqa: PLW1509 - the terminal's alone, see _spawn_on_terminal
    )


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Child:
    """A process started in a new session, so its group can be signalled and killed as one."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        pipes: dict[Stream, int],
        stdin_fd: int | None,
        sink: Sink,
        *,
        terminal_fd: int | None = None,
    ):
        self._loop = asyncio.get_running_loop()
        self._popen = popen
        self._terminal_fd = terminal_fd  # the pty's master, read as STDOUT (stdin writes to a dup of it)
        self.pid = popen.pid
        # What wait4 said of the leader and the children it reaped, once it is reaped.
        self.rusage: resource.struct_rusage | None = None
        # What measures it and its children (app.agent.meter), for a background process's run.
        self.meter: Meter | None = None
        self._sink = sink
        self._pipes = dict(pipes)
        self._read_sizes = dict.fromkeys(pipes, READ_BYTES)
        self._stdin_fd = stdin_fd
        self._stdin_waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] = self._loop.create_future()
        self._leader_exit: asyncio.Future[int] = self._loop.create_future()
        for stream, fd in pipes.items():
            self._loop.add_reader(fd, self._on_readable, stream, fd)
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._on_leader_exit)
        self._task = self._loop.create_task(self._finish(), name=f"child-{self.pid}")

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        stdin: bool,
        sink: Sink,
        terminal: TerminalSize | None = None,
    ) -> Child:
        """Starts argv (no shell) in a new session with its output going to sink; with terminal,
        on a new pseudo-terminal of that size instead of pipes. Every signal starts at its default."""
        _defaults_once()
        if terminal is not None:
            return cls._spawn_on_terminal(argv, env=env, cwd=cwd, sink=sink, size=terminal)
        fds: list[int] = []
        with _closed_on_failure(argv[0], fds):
            out_r, out_w = _pipe(grow=True)
            fds += [out_r, out_w]
            err_r, err_w = _pipe(grow=True)
            fds += [err_r, err_w]
            in_r, in_w = _pipe(grow=False) if stdin else (subprocess.DEVNULL, -1)
            fds += [fd for fd in (in_r, in_w) if fd >= 0]
            popen = _popen(argv, env=env, cwd=cwd, stdin=in_r, stdout=out_w, stderr=err_w)
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.set_blocking(fd, False)
        pipes = {Stream.STDOUT: out_r, Stream.STDERR: err_r}
        return cls(popen, pipes, in_w if in_w >= 0 else None, sink)

    @classmethod
    def _spawn_on_terminal(
        cls, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, sink: Sink, size: TerminalSize
    ) -> Child:
        """The leader of a new session whose controlling terminal, stdin, stdout and stderr are the
        slave of a new pty; the master carries its output (one stream, STDOUT) and its typed input."""
        master, slave = os.openpty()  # both close-on-exec: the child gets the slave as 0, 1 and 2 only
        fds = [master, slave]
        with _closed_on_failure(argv[0], fds, terminal=True):
            _set_size(master, size)
            fds.append(writer := os.dup(master))
            popen = _popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                # Python has no other way to TIOCSCTTY between setsid and exec. What runs in the
                # forked child is one ioctl: it takes no lock another thread of the agent could hold.
                preexec_fn=_take_terminal,
            )
        # Only the child holds the slave now: once every process on it has closed it, reading the
        # master fails with EIO, the terminal's end of output.
        os.close(slave)
        os.set_blocking(master, False)  # the dup shares the open file, so it is non-blocking too
        return cls(popen, {Stream.STDOUT: master}, writer, sink, terminal_fd=master)

    @property
    def terminal(self) -> bool:
        """True when the process runs on a pseudo-terminal."""
        return self._terminal_fd is not None

    def resize(self, size: TerminalSize) -> None:
        """Gives the pseudo-terminal a new size; InvalidState for a process without one."""
        if self._terminal_fd is None:
            raise InvalidState(f"process {self.pid} has no terminal: start it with terminal set to resize it")
        if Stream.STDOUT not in self._pipes:  # every process on it has gone, and the master with them
            raise InvalidState(f"the terminal of process {self.pid} is closed")
        _set_size(self._terminal_fd, size)

    @property
    def has_exited(self) -> bool:
        """True once the leader has exited (its output may still be draining)."""
        return self._leader_exit.done()

    async def wait(self) -> int:
        """The leader's exit code (-N for signal N), once its group is gone and its pipes drained."""
        return await asyncio.shield(self._task)

    def signal(self, signum: int, *, group: bool = True) -> None:
        """Sends a signal to the process group, or to the leader alone."""
        if self._leader_exit.done():
            return  # the pid and group id may already belong to someone else
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)

    def _on_readable(self, stream: Stream, fd: int) -> None:
        size = self._read_sizes[stream]
        # A read of what the pipe holds, no more: os.read allocates all it asks for, then shrinks
        # the bytes to what came, which left the rest of each buffer a hole in the heap that the
        # log's chunks (kept, then evicted oldest first) fragmented into several MiB over the cap.
        waiting = _waiting(fd)
        try:
            data = os.read(fd, min(waiting, size) if waiting > 0 else size)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            # Few big reads cost far less than many small ones when a writer floods the pipe.
            if len(data) == size:
                self._read_sizes[stream] = min(size * 4, MAX_READ_BYTES)
            elif len(data) <= size // 4:
                self._read_sizes[stream] = max(size // 4, READ_BYTES)
            self._sink(stream, data)
        else:
            self._close_pipe(stream)

    def _close_pipe(self, stream: Stream) -> None:
        fd = self._pipes.pop(stream)
        self._loop.remove_reader(fd)
        os.close(fd)
        if not self._pipes and not self._drained.done():
            self._drained.set_result(None)

    def _on_leader_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        # The leader is a zombie until reaped, so its group id cannot be reused yet: kill the rest
        # of the group now, so no orphan keeps the pipes open.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            _, status, self.rusage = os.wait4(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else's waitpid(-1): the status is lost
            logger.warning("pid %d was reaped outside the agent; its exit status is unknown", self.pid)
            code = 255
        self._popen.returncode = code  # so Popen never tries to reap the pid itself
        self._leader_exit.set_result(code)

    async def _finish(self) -> int:
        code = await self._leader_exit
        if self._pipes:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_SEC):
                    await asyncio.shield(self._drained)
            except TimeoutError:
                logger.warning("pid %d: a process outside its group still holds its output pipes", self.pid)
        for stream in list(self._pipes):
            self._read_rest(stream)
        self.close_input()
        return code

    def _read_rest(self, stream: Stream) -> None:
        fd = self._pipes[stream]
        with contextlib.suppress(OSError):  # EAGAIN: nothing more is waiting
            # What the pipe holds, not what an escaped writer keeps adding.
            for _ in range(PIPE_BYTES // READ_BYTES):
                data = os.read(fd, READ_BYTES)
                if not data:
                    break
                self._sink(stream, data)
        self._close_pipe(stream)

    def kill_now(self) -> None:
        """Kills the group and gives up on its pipes at once (the capsule is going away)."""
        self.signal(signal.SIGKILL)
        for stream in list(self._pipes):
            self._close_pipe(stream)

    async def write_input(self, data: bytes, *, timeout_sec: float) -> None:
        """Writes to the process's stdin, or raises InvalidState if it will not take it in time."""
        view = memoryview(data)
        try:
            async with asyncio.timeout(timeout_sec):
                while view:
                    if self._stdin_fd is None:
                        raise BrokenPipeError
                    try:
                        view = view[os.write(self._stdin_fd, view) :]
                    except BlockingIOError:
                        await self._stdin_writable(self._stdin_fd)
        except TimeoutError:
            raise InvalidState(
                f"process {self.pid} did not read its stdin for {timeout_sec:g} s: "
                f"{len(data) - len(view)} of {len(data)} bytes were written"
            ) from None
        except BrokenPipeError:
            raise InvalidState(f"process {self.pid} has closed its stdin") from None

    async def _stdin_writable(self, fd: int) -> None:
        waiter = self._stdin_waiter = self._loop.create_future()
        self._loop.add_writer(fd, _resolve, waiter)
        try:
            await waiter
        finally:
            self._stdin_waiter = None
            if self._stdin_fd == fd:
                self._loop.remove_writer(fd)

    def close_input(self) -> None:
        """Closes the process's stdin (EOF for it); a pending write fails."""
        if self._stdin_fd is None:
            return
        fd, self._stdin_fd = self._stdin_fd, None
        self._loop.remove_writer(fd)
        if self._stdin_waiter is not None and not self._stdin_waiter.done():
            self._stdin_waiter.set_exception(BrokenPipeError())
        os.close(fd)

    @property
    def input_open(self) -> bool:
        """True while the process's stdin can still be written."""
        return self._stdin_fd is not None

"""One background process of a capsule: its child, output log, lifetime limit and how it ended."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from app.agent.child import Child
from app.agent.output_log import OutputLog
from app.domain import ProcessInfo, ProcessStatus, TerminalSize, to_signal, utcnow
from app.errors import InvalidState


def exit_fields(code: int) -> tuple[int | None, signal.Signals | None]:
    """An exit code (-N for signal N) as (exit_code, signal): one of them is set."""
    if code >= 0:
        return code, None
    signum = to_signal(-code)
    return (code, None) if signum is None else (None, signum)


class ManagedProcess:
    """A process started in the background; its exit is recorded once its output is drained."""

    def __init__(
        self,
        *,
        capsule_id: str,
        tag: str,
        argv: Sequence[str],
        cwd: Path,
        stdin: bool,
        child: Child,
        log: OutputLog,
    ) -> None:
        self.capsule_id = capsule_id
        self.tag = tag
        self.pid = child.pid
        self.log = log
        self._argv = tuple(argv)
        self._cwd = str(cwd)
        self._stdin = stdin
        self._child = child
        self._started_at = utcnow()
        self._ended_at: datetime | None = None
        self._exit_code: int | None = None
        self._signal: signal.Signals | None = None
        self._timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._exited = asyncio.Event()
        self._input_lock = asyncio.Lock()

    @property
    def is_running(self) -> bool:
        """True until the exit event is in the log."""
        return not self._exited.is_set()

    @property
    def started_at(self) -> datetime:
        """When the process was spawned."""
        return self._started_at

    def info(self) -> ProcessInfo:
        """A snapshot of what is known of the process."""
        return ProcessInfo(
            capsule_id=self.capsule_id,
            pid=self.pid,
            tag=self.tag,
            cmd=self._argv[0],
            args=self._argv[1:],
            cwd=self._cwd,
            status=ProcessStatus.RUNNING if self.is_running else ProcessStatus.EXITED,
            started_at=self._started_at,
            exit_code=self._exit_code,
            signal=self._signal,
            timed_out=self._timed_out,
            ended_at=self._ended_at,
            stdin=self._stdin,
            terminal=self._child.terminal,
        )

    def limit_lifetime(self, timeout_sec: float) -> None:
        """Kills the group when the lifetime runs out."""
        self._timer = asyncio.get_running_loop().call_later(timeout_sec, self._on_timeout)

    def _on_timeout(self) -> None:
        if self.is_running and not self._child.has_exited:
            self._timed_out = True
            self._child.signal(signal.SIGKILL)

    async def run(self) -> ProcessInfo:
        """Waits for the exit, then appends the exit event; returns the final info."""
        code = await self._child.wait()
        if self._timer is not None:
            self._timer.cancel()
        self._exit_code, self._signal = exit_fields(code)
        exit_event = self.log.close(
            exit_code=self._exit_code, signum=self._signal, timed_out=self._timed_out, ended_at=utcnow()
        )
        self._ended_at = exit_event.ended_at
        self._exited.set()
        return self.info()

    async def wait(self, timeout_sec: float | None = None) -> bool:
        """Waits for the exit to be recorded; False if timeout_sec ran out first."""
        try:
            async with asyncio.timeout(timeout_sec):
                await self._exited.wait()
        except TimeoutError:
            return False
        return True

    def signal(self, signum: signal.Signals, *, group: bool) -> None:
        """Sends a signal to the group or the process; an exited process is InvalidState."""
        self._require_running()
        self._child.signal(signum, group=group)

    def kill(self) -> None:
        """SIGKILL to the group and no more waiting for its pipes."""
        self._child.kill_now()

    async def send_input(self, data: bytes, *, timeout_sec: float) -> None:
        """Writes to stdin, in call order; bounded by timeout_sec."""
        async with self._input_lock:
            self._require_input()
            await self._child.write_input(data, timeout_sec=timeout_sec)

    async def close_input(self) -> None:
        """Closes stdin, after any write in progress; a terminal's input is not closed but ended
        by typing, so that is InvalidState."""
        async with self._input_lock:
            if self._child.terminal:
                raise InvalidState(
                    f"process {self.pid} ({self.tag}) runs on a terminal, whose input stays open: "
                    "send \\u0004 (Ctrl-D) at the start of a line for end of file"
                )
            self._require_input()
            self._child.close_input()

    def resize_terminal(self, size: TerminalSize) -> None:
        """The terminal's new size (SIGWINCH for its foreground job); InvalidState without one."""
        if not self._child.terminal:
            raise InvalidState(
                f"process {self.pid} ({self.tag}) has no terminal: start it with terminal set to resize it"
            )
        self._require_running()
        self._child.resize(size)

    def _require_running(self) -> None:
        if not self.is_running:
            raise InvalidState(f"process {self.pid} ({self.tag}) has already exited")

    def _require_input(self) -> None:
        if not self._stdin:
            raise InvalidState(
                f"process {self.pid} ({self.tag}) was started without stdin: start it with stdin enabled"
            )
        self._require_running()
        if not self._child.input_open:
            raise InvalidState(f"stdin of process {self.pid} ({self.tag}) is already closed")

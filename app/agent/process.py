"""One background process of a capsule: its child (one a run, under a restart policy), output log,
lifetime limit, readiness and how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from app.agent.child import Child
from app.agent.output_log import OutputLog
from app.agent.supervision import Backoff, Supervision, should_restart, wait_for_port
from app.domain import (
    ProcessEvent,
    ProcessEventKind,
    ProcessInfo,
    ProcessStatus,
    ResourceUsage,
    Stream,
    TerminalSize,
    to_signal,
    utcnow,
)
from app.errors import CapsuleError, InvalidState

logger = logging.getLogger(__name__)


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
        supervision: Supervision | None = None,
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
        self._terminal_size: TerminalSize | None = None  # the last resizeTerminal's
        # The run whose leader was reaped last: its final usage, and whether the OOM killer ended it.
        self._finished: tuple[Child, ResourceUsage | None, bool] | None = None
        self._supervision = supervision
        # Set before the service signals, stops or times the process out: no restart after that.
        self._for_good = asyncio.Event()
        self._restarts = 0
        readiness = None if supervision is None else supervision.readiness
        self._ready = readiness is None
        self._ready_at = self._started_at if self._ready else None
        self._run_ready = asyncio.Event()
        if supervision is not None and supervision.matcher is not None:
            supervision.matcher.on_match = self._became_ready

    @property
    def is_running(self) -> bool:
        """True until the exit event is in the log."""
        return not self._exited.is_set()

    @property
    def started_at(self) -> datetime:
        """When the process was spawned."""
        return self._started_at

    def info(self, *, just_started: bool = False) -> ProcessInfo:
        """A snapshot of what is known of the process (just_started: as its start or restart
        answers, the instant after the fork)."""
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
            restarts=self._restarts,
            ready=self._ready,
            ready_at=self._ready_at,
            oom_killed=self._oom_killed(),
            usage=self._usage(just_started),
        )

    def _current_finished(self) -> tuple[Child, ResourceUsage | None, bool] | None:
        return self._finished if self._finished is not None and self._finished[0] is self._child else None

    def _oom_killed(self) -> bool:
        finished = self._current_finished()
        return finished is not None and finished[2]

    def _usage(self, just_started: bool = False) -> ResourceUsage | None:
        """The current run's usage now, or its final totals once its leader is reaped."""
        finished = self._current_finished()
        if finished is not None:
            return finished[1]
        return None if self._child.meter is None else self._child.meter.usage(at_start=just_started)

    async def _finish_run(self, code: int) -> None:
        """Keeps the ended run's final totals, and whether the kernel's OOM killer ended it."""
        child = self._child
        usage, oom = None, False
        if child.meter is not None:
            usage, oom = await child.meter.finish(child.rusage, code)
        self._finished = (child, usage, oom)

    def limit_lifetime(self, timeout_sec: float) -> None:
        """Kills the group when the lifetime runs out."""
        self._timer = asyncio.get_running_loop().call_later(timeout_sec, self._on_timeout)

    def _on_timeout(self) -> None:
        if self.is_running:  # between runs too: the lifetime is the process's, not a run's
            self._timed_out = True
            self._for_good.set()
            self._child.signal(signal.SIGKILL)

    async def run(self) -> ProcessInfo:
        """Waits for each run's exit, starts the next while the restart policy says so, then appends
        the exit event; returns the final info."""
        loop = asyncio.get_running_loop()
        backoff = None
        while True:
            run_started = loop.time()
            watch = self._watch_readiness()
            try:
                code = await self._child.wait()
            finally:
                if watch is not None:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
            await self._finish_run(code)
            if self._supervision is None:
                break
            self._supervision.run_ended(self._child.pid)
            restart = self._supervision.restart
            if restart is None or not self._restarts_after(code):
                break
            if self._supervision.readiness is not None:  # nothing runs until the next run: not ready
                self._ready, self._ready_at = False, None
            backoff = backoff or Backoff(restart)
            delay = backoff.next_delay(loop.time() - run_started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._for_good.wait()
            if self._for_good.is_set() or not self._next_run(code):
                break
        if self._timer is not None:
            self._timer.cancel()
        self._exit_code, self._signal = exit_fields(code)
        exit_event = self.log.close(
            exit_code=self._exit_code,
            signum=self._signal,
            timed_out=self._timed_out,
            ended_at=utcnow(),
            oom_killed=self._oom_killed(),
        )
        self._ended_at = exit_event.ended_at
        self._exited.set()
        return self.info()

    def _restarts_after(self, code: int) -> bool:
        assert self._supervision is not None and self._supervision.restart is not None
        restart = self._supervision.restart
        if self._for_good.is_set():
            return False
        if restart.max_restarts is not None and self._restarts >= restart.max_restarts:
            return False
        return should_restart(restart.policy, code)

    def _next_run(self, code: int) -> bool:
        """Starts the next run; False (the reason in the log) when it cannot start."""
        assert self._supervision is not None
        ended_oom_killed = self._oom_killed()  # the run that ended's, before the next is current
        try:
            child = self._supervision.respawn()
        except CapsuleError as exc:
            logger.info("capsule %s: process %s could not be restarted: %s", self.capsule_id, self.tag, exc)
            reason = f"capsule: process {self.tag} could not be restarted, so it ends: {exc}\n"
            self.log.append_output(Stream.STDERR, reason.encode())
            return False
        self._child, self.pid = child, child.pid
        if self._terminal_size is not None:  # the new run's terminal: the size it was last given
            child.resize(self._terminal_size)
        self._restarts += 1
        if self._supervision.readiness is not None:  # each run becomes ready anew
            self._run_ready.clear()
            if self._supervision.matcher is not None:
                self._supervision.matcher.rearm()
        exit_code, signum = exit_fields(code)
        self.log.restarted(
            pid=child.pid,
            restarts=self._restarts,
            exit_code=exit_code,
            signum=signum,
            oom_killed=ended_oom_killed,
        )
        logger.info(
            "capsule %s: process %s restarted (%d) as pid %d",
            self.capsule_id,
            self.tag,
            self._restarts,
            self.pid,
        )
        self._supervision.publish(ProcessEvent(ProcessEventKind.RESTARTED, self.info(just_started=True)))
        return True

    def _watch_readiness(self) -> asyncio.Task[None] | None:
        """The check of the current run's readiness, bounded by its timeout."""
        if self._supervision is None or self._supervision.readiness is None or self._ready:
            return None
        check = self._check_readiness(self._child)
        return asyncio.create_task(check, name=f"ready-{self.capsule_id}-{self.pid}")

    async def _check_readiness(self, child: Child) -> None:
        assert self._supervision is not None and self._supervision.readiness is not None
        readiness = self._supervision.readiness
        try:
            async with asyncio.timeout(readiness.timeout_sec):
                if readiness.port is not None:
                    await wait_for_port(readiness.port)
                    self._became_ready()
                else:
                    await self._run_ready.wait()
        except TimeoutError:
            if self._ready or child is not self._child or child.has_exited:
                return
            what = f"port {readiness.port}" if readiness.port is not None else "outputPattern"
            reason = (
                f"capsule: process {self.tag} was not ready ({what}) within {readiness.timeout_sec:g} s, "
                "so its group was killed\n"
            )
            self.log.append_output(Stream.STDERR, reason.encode())
            self._for_good.set()
            child.signal(signal.SIGKILL)

    def _became_ready(self) -> None:
        if self._ready or not self.is_running or self._supervision is None:
            return
        self._ready, self._ready_at = True, utcnow()
        self._run_ready.set()
        logger.info("capsule %s: process %s (pid %d) is ready", self.capsule_id, self.tag, self.pid)
        self._supervision.publish(ProcessEvent(ProcessEventKind.READY, self.info()))

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
        self._for_good.set()
        self._child.signal(signum, group=group)

    def kill(self) -> None:
        """SIGKILL to the group and no more waiting for its pipes."""
        self._for_good.set()
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
        self._terminal_size = size  # a restart's new terminal takes it too
        if not self._child.has_exited:  # between runs: only remembered
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

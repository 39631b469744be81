"""A capsule's supervisor: spawns, signals, reaps and logs the processes of one capsule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from app.agent import launch
from app.agent.child import Child
from app.agent.events import Publish
from app.agent.leftovers import Sessions, boot_ticks
from app.agent.meter import Meters, ProcMeters
from app.agent.output_log import OutputLog
from app.agent.process import ManagedProcess
from app.agent.supervision import LineMatcher, Supervision
from app.agent.tally import OutputCounts, OutputTally
from app.config import Settings
from app.domain import (
    SENDABLE_SIGNALS,
    ExecResult,
    ExecSpec,
    InputLimits,
    OutputEvent,
    ProcessEvent,
    ProcessEventKind,
    ProcessInfo,
    ProcessSpec,
    SignalScope,
    Stream,
    TerminalSize,
    check_readiness,
    check_restart,
    check_tag,
    check_terminal_size,
    check_timeout,
    new_tag,
    to_signal,
)
from app.errors import Conflict, InvalidRequest, NotFound, RateLimited

logger = logging.getLogger(__name__)

# SIGKILL cannot be ignored; this only bounds a wait on a process stuck in the kernel.
KILL_WAIT_SEC = 10.0
# What a terminal process is told it runs on, unless its envs say otherwise (xterm.js emulates this).
TERM = "xterm-256color"
_SIGNAL_NAMES = ", ".join(sorted(s.name for s in SENDABLE_SIGNALS))


class _Capture:
    """Exec output per stream, up to a cap; what is past the cap is read and dropped."""

    def __init__(self, cap_bytes: int) -> None:
        self._cap = cap_bytes
        self._parts: dict[Stream, list[bytes]] = {Stream.STDOUT: [], Stream.STDERR: []}
        self._sizes = dict.fromkeys(Stream, 0)
        self.truncated = False

    def add(self, stream: Stream, data: bytes) -> None:
        room = self._cap - self._sizes[stream]
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        if data:
            self._parts[stream].append(data)
            self._sizes[stream] += len(data)

    def output(self, stream: Stream) -> bytes:
        return b"".join(self._parts[stream])


class Supervisor:
    """The processes of one capsule; the plain runtime runs them on the host in its workspace."""

    def __init__(
        self,
        capsule_id: str,
        workspace: Path,
        settings: Settings,
        publish: Publish,
        *,
        sessions_file: Path | None = None,
        meters: Meters | None = None,
    ) -> None:
        self.capsule_id = capsule_id
        self.workspace = workspace
        self._settings = settings
        self._publish = publish
        self._processes: dict[str, ManagedProcess] = {}  # by tag, in start order
        self._running: set[ManagedProcess] = set()  # those of them not yet exited
        self._reapers: set[asyncio.Task[None]] = set()
        self._drops: dict[str, asyncio.TimerHandle] = {}
        self._execs: set[Child] = set()
        self.sessions = Sessions(sessions_file or workspace.parent / "sessions")
        # What each run of a background process costs: /proc sums, unless given a cgroup per run.
        self._meters: Meters = meters or ProcMeters()
        self.tally = OutputTally()  # what its processes' output cost, for the agent's metrics

    def running_count(self) -> int:
        """How many background processes are running."""
        return len(self._running)

    def held_log_bytes(self) -> int:
        """What the output logs of its processes hold, against their caps (for the agent's metrics)."""
        return sum(proc.log.retained_bytes for proc in self._processes.values())

    def output_counts(self) -> OutputCounts:
        """Its output counters now, with the log bytes held (for the agent's metrics)."""
        tally = self.tally
        return OutputCounts(
            pipe_bytes=tally.pipe_bytes,
            log_bytes_held=self.held_log_bytes(),
            evicted_events=tally.evicted_events,
            evicted_bytes=tally.evicted_bytes,
        )

    async def exec(self, spec: ExecSpec) -> ExecResult:
        """Runs a command to completion or timeout; the group is killed on timeout."""
        timeout_sec = check_timeout(spec.timeout_sec) or self._settings.exec_default_timeout_sec
        argv = launch.argv(spec.cmd, spec.args)
        env = launch.environment(self.workspace, spec.envs)
        cwd = launch.working_dir(self.workspace, spec.cwd)
        capture = _Capture(self._settings.exec_output_cap_bytes)
        tally = self.tally

        def sink(stream: Stream, data: bytes) -> None:
            tally.pipe_bytes += len(data)
            capture.add(stream, data)

        started = time.monotonic()
        spawned_after = boot_ticks()
        child = Child.spawn(argv, env=env, cwd=cwd, stdin=spec.stdin is not None, sink=sink)
        self.sessions.add(child.pid, spawned_after)
        self._execs.add(child)
        feeder = (
            None if spec.stdin is None else asyncio.create_task(self._feed(child, spec.stdin, timeout_sec))
        )
        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout_sec):
                    code = await child.wait()
            except TimeoutError:
                timed_out = True
                child.signal(signal.SIGKILL)
                code = await child.wait()
        finally:
            self._execs.discard(child)
            if not child.has_exited:  # the caller went away: leave nothing running
                child.kill_now()
            self.sessions.remove(child.pid)
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
        return ExecResult(
            stdout=capture.output(Stream.STDOUT),
            stderr=capture.output(Stream.STDERR),
            exit_code=code,
            signal=to_signal(-code) if code < 0 else None,
            duration_ms=int((time.monotonic() - started) * 1000),
            timed_out=timed_out,
            truncated=capture.truncated,
        )

    @staticmethod
    async def _feed(child: Child, data: bytes, timeout_sec: float) -> None:
        try:
            await child.write_input(data, timeout_sec=timeout_sec)
        except Exception:  # the process exited or closed stdin without reading it all
            logger.debug("pid %d did not take all of its stdin", child.pid)
        finally:
            child.close_input()

    def start(self, spec: ProcessSpec, *, max_running: int = 0) -> ProcessInfo:
        """Starts a background process and answers at once; RateLimited when the capsule already
        runs max_running of them (0: no limit)."""
        if max_running and (running := self.running_count()) >= max_running:
            raise RateLimited(
                f"capsule {self.capsule_id} runs {running} processes, the most it may: "
                "stop one before starting another"
            )
        argv = launch.argv(spec.cmd, spec.args)
        env = launch.environment(self.workspace, spec.envs)
        cwd = launch.working_dir(self.workspace, spec.cwd)
        timeout_sec = check_timeout(spec.timeout_sec)
        tag = check_tag(spec.tag) if spec.tag is not None else self._new_tag()
        if (other := self._processes.get(tag)) is not None:
            raise Conflict(
                f"tag {tag!r} is already used by process {other.pid} in capsule {self.capsule_id}: "
                "choose another tag"
            )
        terminal = None if spec.terminal is None else check_terminal_size(spec.terminal, prefix="terminal.")
        stdin = spec.stdin or terminal is not None  # a terminal's input is what is typed
        if terminal is not None and "TERM" not in env:
            env = {**env, "TERM": TERM}
        restart = None if spec.restart is None else check_restart(spec.restart)
        readiness = None if spec.readiness is None else check_readiness(spec.readiness, InputLimits())
        log = OutputLog(self._settings.output_cap_bytes, self.tally)
        pattern = None if readiness is None else readiness.output_pattern
        matcher = None if pattern is None else LineMatcher(pattern, log.append_output)
        sink = log.append_output if matcher is None else matcher.feed

        def spawn() -> Child:  # each run of the process, the first and every restart
            spawned_after = boot_ticks()
            child = self._meters.spawn(
                lambda: Child.spawn(argv, env=env, cwd=cwd, stdin=stdin, sink=sink, terminal=terminal)
            )
            self.sessions.add(child.pid, spawned_after)
            return child

        child = spawn()
        supervision = Supervision(
            respawn=spawn,
            publish=self._publish,
            run_ended=self.sessions.remove,
            restart=restart,
            readiness=readiness,
            matcher=matcher,
        )
        proc = ManagedProcess(
            capsule_id=self.capsule_id,
            tag=tag,
            argv=argv,
            cwd=cwd,
            stdin=stdin,
            child=child,
            log=log,
            supervision=supervision,
        )
        if timeout_sec:  # 0, like absent, sets no lifetime limit
            proc.limit_lifetime(timeout_sec)
        self._processes[tag] = proc
        self._running.add(proc)
        info = proc.info(just_started=True)
        logger.info("capsule %s: started pid %d tag %s (%s)", self.capsule_id, proc.pid, tag, argv[0])
        self._publish(ProcessEvent(ProcessEventKind.STARTED, info))
        reaper = asyncio.create_task(self._reap(proc), name=f"reap-{self.capsule_id}-{proc.pid}")
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        return info

    def _new_tag(self) -> str:
        while (tag := new_tag()) in self._processes:
            pass
        return tag

    async def _reap(self, proc: ManagedProcess) -> None:
        info = await proc.run()
        self._running.discard(proc)  # at once: nothing ran since its exit event went into the log
        self.sessions.remove(proc.pid)
        logger.info(
            "capsule %s: pid %d tag %s exited (code %s, signal %s)",
            self.capsule_id,
            proc.pid,
            proc.tag,
            info.exit_code,
            info.signal.name if info.signal else None,
        )
        self._publish(ProcessEvent(ProcessEventKind.EXITED, info))
        loop = asyncio.get_running_loop()
        self._drops[proc.tag] = loop.call_later(self._settings.retention_sec, self._drop, proc)

    def _drop(self, proc: ManagedProcess) -> None:
        self._drops.pop(proc.tag, None)
        if self._processes.get(proc.tag) is proc:
            del self._processes[proc.tag]

    def _find(self, selector: int | str) -> ManagedProcess:
        if isinstance(selector, str):
            proc = self._processes.get(selector)
        else:  # a PID may repeat among retained processes: the running one, else the latest
            matches = [p for p in self._processes.values() if p.pid == selector]
            proc = max(matches, key=lambda p: (p.is_running, p.started_at), default=None)
        if proc is None:
            raise NotFound(f"no process {selector} in capsule {self.capsule_id}")
        return proc

    def list_processes(self) -> list[ProcessInfo]:
        """Running processes first, then retained exited ones, each in start order."""
        procs = sorted(self._processes.values(), key=lambda p: (not p.is_running, p.started_at))
        return [proc.info() for proc in procs]

    def get(self, selector: int | str) -> ProcessInfo:
        """One process by PID or tag."""
        return self._find(selector).info()

    def signal(self, selector: int | str, signum: int, scope: SignalScope) -> ProcessInfo:
        """Sends one of the sendable signals to the process or its group."""
        sig = to_signal(signum)
        if sig is None or sig not in SENDABLE_SIGNALS:
            raise InvalidRequest(f"signal {signum} cannot be sent: use one of {_SIGNAL_NAMES}")
        proc = self._find(selector)
        proc.signal(sig, group=scope is SignalScope.GROUP)
        return proc.info()

    async def stop(self, selector: int | str, grace_sec: float) -> ProcessInfo:
        """SIGTERM to the group, SIGKILL after grace_sec; answers once the process has exited."""
        grace_sec = check_timeout(grace_sec, name="graceSec") or 0.0
        proc = self._find(selector)
        if not proc.is_running:
            return proc.info()
        proc.signal(signal.SIGTERM, group=True)
        proc.signal(signal.SIGCONT, group=True)  # a stopped process could not act on SIGTERM
        if not await proc.wait(grace_sec) and proc.is_running:
            proc.signal(signal.SIGKILL, group=True)
            await proc.wait(KILL_WAIT_SEC)
        return proc.info()

    async def send_input(self, selector: int | str, data: bytes) -> None:
        """Writes to a process's stdin; bounded by settings.input_timeout_sec."""
        await self._find(selector).send_input(data, timeout_sec=self._settings.input_timeout_sec)

    async def close_input(self, selector: int | str) -> None:
        """Closes a process's stdin."""
        await self._find(selector).close_input()

    def resize_terminal(self, selector: int | str, size: TerminalSize) -> None:
        """Gives a process's pseudo-terminal a new size; the kernel sends SIGWINCH."""
        check_terminal_size(size)
        self._find(selector).resize_terminal(size)

    def output(self, selector: int | str, from_seq: int) -> AsyncIterator[list[OutputEvent]]:
        """The process's output log from from_seq, live until its exit event."""
        if from_seq < 0:
            raise InvalidRequest(f"fromSeq is negative ({from_seq}): pass 0 or the last seq seen plus one")
        return self._find(selector).log.follow(from_seq)

    async def close(self) -> None:
        """Kills every process group of the capsule and waits until their exits are recorded."""
        for proc in self._processes.values():
            if proc.is_running:
                proc.kill()
        for child in self._execs:
            child.kill_now()
        if self._reapers:
            await asyncio.wait(set(self._reapers), timeout=KILL_WAIT_SEC)
        for handle in self._drops.values():
            handle.cancel()
        self._drops.clear()
        self._processes.clear()
        self._running.clear()

"""Process and ProcessEvent; processes, process, start/signal/stop, input, processEvents."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

import strawberry
from strawberry import ID

from app import domain
from app.api.auth import team_field, team_mutation, team_subscription
from app.api.context import Info
from app.api.enums import (
    Encoding,
    ProcessEventKind,
    ProcessStatus,
    RestartPolicy,
    Signal,
    SignalScope,
    WaitCondition,
)
from app.api.usage import ResourceUsage


@strawberry.input
class EnvVarInput:
    name: str
    value: str

    def to_env(self) -> domain.EnvVar:
        return domain.EnvVar(name=self.name, value=self.value)


@strawberry.input
class CommandInput:
    """What every way of running a command takes."""

    cmd: str
    args: list[str] = strawberry.field(default_factory=list)
    envs: list[EnvVarInput] = strawberry.field(default_factory=list)
    cwd: str | None = None

    def command(self) -> dict[str, Any]:
        """The command's fields as a spec takes them."""
        return {
            "cmd": self.cmd,
            "args": tuple(self.args),
            "envs": tuple(e.to_env() for e in self.envs),
            "cwd": self.cwd,
        }


@strawberry.input
class TerminalInput:
    cols: int = 80
    rows: int = 24

    def to_size(self) -> domain.TerminalSize:
        return domain.TerminalSize(cols=self.cols, rows=self.rows)


@strawberry.input
class RestartInput:
    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_restarts: int | None = strawberry.field(
        default=5, description="Restarts allowed before it is left EXITED; null: no limit."
    )
    backoff_sec: float = strawberry.field(
        default=1.0,
        description="Delay before the first restart; it doubles with each restart up to maxBackoffSec.",
    )
    max_backoff_sec: float = 30.0

    def to_spec(self) -> domain.RestartSpec:
        return domain.RestartSpec(
            policy=self.policy.to_domain(),
            max_restarts=self.max_restarts,
            backoff_sec=self.backoff_sec,
            max_backoff_sec=self.max_backoff_sec,
        )


@strawberry.input
class ReadinessInput:
    port: int | None = strawberry.field(
        default=None, description="Ready once something in the capsule accepts TCP connections on this port."
    )
    output_pattern: str | None = strawberry.field(
        default=None,
        description="Ready once a line of its output matches this regular expression (Python re syntax).",
    )
    timeout_sec: int = strawberry.field(
        default=60, description="Not ready by then: its group is killed and it ends with ready false."
    )

    def to_spec(self) -> domain.ReadinessSpec:
        return domain.ReadinessSpec(
            port=self.port, output_pattern=self.output_pattern, timeout_sec=self.timeout_sec
        )


@strawberry.input
class StartProcessInput(CommandInput):
    tag: str | None = strawberry.field(
        default=None,
        description="Unique among the capsule's processes; not all digits. "
        "Generated as proc-<8 hex> when absent.",
    )
    stdin: bool = strawberry.field(
        default=False,
        description="When false, the process reads an empty stdin and sendInput answers INVALID_STATE.",
    )
    timeout_sec: int | None = strawberry.field(
        default=None,
        description="Lifetime in seconds, after which the process group is killed; null: no limit.",
    )
    terminal: TerminalInput | None = strawberry.field(
        default=None,
        description="Run it on a pseudo-terminal of this size: one output stream (STDOUT), "
        "input as typed keys (stdin is implied).",
    )

    restart: RestartInput | None = strawberry.field(
        default=None, description="Start it again when it ends; null: never."
    )
    readiness: ReadinessInput | None = strawberry.field(
        default=None, description="When it counts as ready; null: ready once started."
    )

    def to_spec(self) -> domain.ProcessSpec:
        return domain.ProcessSpec(
            **self.command(),
            tag=self.tag,
            stdin=self.stdin,
            timeout_sec=self.timeout_sec,
            terminal=None if self.terminal is None else self.terminal.to_size(),
            restart=None if self.restart is None else self.restart.to_spec(),
            readiness=None if self.readiness is None else self.readiness.to_spec(),
        )


@strawberry.type
class Process:
    capsule_id: ID
    pid: int
    tag: str
    cmd: str
    args: list[str]
    cwd: str | None
    status: ProcessStatus
    exit_code: int | None = strawberry.field(description="Set once the process has exited normally.")
    signal: Signal | None = strawberry.field(description="Set when a signal ended the process.")
    timed_out: bool = strawberry.field(
        description="True when the process's lifetime (timeoutSec) ran out and the service ended it."
    )
    started_at: datetime
    ended_at: datetime | None
    terminal: bool = strawberry.field(description="True when it runs on a pseudo-terminal.")
    ready: bool = strawberry.field(
        description="True once its readiness check passed; true from the start for a process without one."
    )
    ready_at: datetime | None
    restarts: int = strawberry.field(
        description="How often its restart policy started it again; each run has a new pid, "
        "the tag and the output stream stay."
    )
    oom_killed: bool = strawberry.field(description="True when the kernel's out-of-memory killer ended it.")
    usage: ResourceUsage | None = strawberry.field(
        description="CPU and memory of the process and its children (the last run's totals once it has "
        "exited); null where the runtime cannot measure it."
    )

    @classmethod
    def from_info(cls, info: domain.ProcessInfo) -> Process:
        return cls(
            capsule_id=ID(info.capsule_id),
            pid=info.pid,
            tag=info.tag,
            cmd=info.cmd,
            args=list(info.args),
            cwd=info.cwd or None,
            status=info.status,
            exit_code=info.exit_code,
            signal=Signal.of(info.signal),
            timed_out=info.timed_out,
            started_at=info.started_at,
            ended_at=info.ended_at,
            terminal=info.terminal,
            ready=info.ready,
            ready_at=info.ready_at,
            restarts=info.restarts,
            oom_killed=info.oom_killed,
            usage=ResourceUsage.of(info.usage),
        )


@strawberry.type
class ProcessEvent:
    kind: ProcessEventKind
    process: Process
    at: datetime = strawberry.field(description="When it happened.")
    cursor: str = strawberry.field(
        description="Where this event stands in the capsule's event history: "
        "pass it as processEvents(after:) to resume."
    )

    @classmethod
    def from_event(cls, event: domain.CapsuleEvent) -> ProcessEvent:
        return cls(
            kind=event.kind, process=Process.from_info(event.process), at=event.at, cursor=event.cursor
        )


@strawberry.type
class ProcessQuery:
    @team_field(description="The capsule's processes, running first; EXITED ones while retained.")
    async def processes(
        self, info: Info, capsule_id: ID, status: ProcessStatus | None = None
    ) -> list[Process]:
        infos = await info.context.services.processes.list(capsule_id, status)
        return [Process.from_info(p) for p in infos]

    @team_field(description="selector: all digits = PID, anything else = tag.")
    async def process(self, info: Info, capsule_id: ID, selector: str) -> Process | None:
        found = await info.context.services.processes.get(capsule_id, selector)
        return None if found is None else Process.from_info(found)

    @team_field(
        description="Returns once the condition holds, the process has exited, or timeoutSec has passed, "
        "whichever comes first: read ready and status."
    )
    async def wait_for_process(
        self,
        info: Info,
        capsule_id: ID,
        selector: str,
        until: WaitCondition = WaitCondition.READY,
        timeout_sec: int = 60,
    ) -> Process:
        found = await info.context.services.processes.wait(
            capsule_id, selector, until=until, timeout_sec=timeout_sec
        )
        return Process.from_info(found)


@strawberry.type
class ProcessMutation:
    @team_mutation(description="Starts a background process and returns at once.")
    async def start_process(self, info: Info, capsule_id: ID, input: StartProcessInput) -> Process:
        started = await info.context.services.processes.start(capsule_id, input.to_spec())
        return Process.from_info(started)

    @team_mutation()
    async def signal_process(
        self,
        info: Info,
        capsule_id: ID,
        selector: str,
        signal: Signal = Signal.SIGKILL,
        scope: SignalScope = domain.SignalScope.GROUP,
    ) -> Process:
        signalled = await info.context.services.processes.signal(
            capsule_id, selector, signum=signal.to_signal(), scope=scope
        )
        return Process.from_info(signalled)

    @team_mutation(
        description="SIGTERM to the group, then SIGKILL after graceSec; returns once the process has exited."
    )
    async def stop_process(self, info: Info, capsule_id: ID, selector: str, grace_sec: int = 10) -> Process:
        stopped = await info.context.services.processes.stop(capsule_id, selector, grace_sec=grace_sec)
        return Process.from_info(stopped)

    @team_mutation()
    async def send_input(
        self, info: Info, capsule_id: ID, selector: str, data: str, encoding: Encoding = domain.Encoding.UTF8
    ) -> bool:
        await info.context.services.processes.send_input(
            capsule_id, selector, domain.decode_input(data, encoding)
        )
        return True

    @team_mutation()
    async def close_input(self, info: Info, capsule_id: ID, selector: str) -> bool:
        await info.context.services.processes.close_input(capsule_id, selector)
        return True

    @team_mutation(description="Tells a process on a pseudo-terminal its new size (it gets SIGWINCH).")
    async def resize_terminal(self, info: Info, capsule_id: ID, selector: str, cols: int, rows: int) -> bool:
        size = domain.TerminalSize(cols=cols, rows=rows)
        await info.context.services.processes.resize_terminal(capsule_id, selector, size)
        return True


@strawberry.type
class ProcessSubscription:
    @team_subscription(
        description="Lifecycle events of every process in the capsule, from every API replica. "
        "With after (a cursor), events since then are replayed first, while retained: "
        "a client that reconnects misses none."
    )
    async def process_events(
        self, info: Info, capsule_id: ID, after: str | None = None
    ) -> AsyncGenerator[ProcessEvent, None]:
        async for event in info.context.services.processes.events(capsule_id, after):
            yield ProcessEvent.from_event(event)

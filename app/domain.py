"""Values and pure rules that both sides of the agent's gRPC surface share."""

from __future__ import annotations

import base64
import enum
import math
import re
import secrets
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from app.errors import InvalidRequest, NotFound

# Tags, capsule ids and host ids: no slash and no leading dot, so an id never names a path elsewhere.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ID_RULE = "use 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
MAX_ID_CHARS = 64
# An environment variable's name; its length is bounded by InputLimits.env_name_bytes.
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_TIMEOUT_SEC = 7 * 24 * 3600

# The signals a caller may send (the contract's Signal enum).
SENDABLE_SIGNALS: frozenset[signal.Signals] = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGKILL,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGTERM,
        signal.SIGCONT,
        signal.SIGSTOP,
    }
)


class CapsuleStatus(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    ERROR = "ERROR"


# Capsules that hold a share of their host: they count against a team's limit and a host's load.
ACTIVE_CAPSULE_STATUSES = frozenset({CapsuleStatus.STARTING, CapsuleStatus.RUNNING})


class ProcessStatus(enum.Enum):
    RUNNING = "RUNNING"
    EXITED = "EXITED"


class Stream(enum.Enum):
    STDOUT = "STDOUT"
    STDERR = "STDERR"


class Encoding(enum.Enum):
    UTF8 = "UTF8"
    BASE64 = "BASE64"


class SignalScope(enum.Enum):
    PROCESS = "PROCESS"
    GROUP = "GROUP"


class WaitCondition(enum.Enum):
    """What waitForProcess waits for (besides the process's exit, which ends any wait)."""

    READY = "READY"
    EXITED = "EXITED"


class ProcessEventKind(enum.Enum):
    STARTED = "STARTED"
    EXITED = "EXITED"
    READY = "READY"
    RESTARTED = "RESTARTED"


def utcnow() -> datetime:
    """The current instant, timezone-aware in UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Makes a datetime aware: naive ones (SQLite drops the zone) are taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# Linux's ceiling for pid_max (PID_MAX_LIMIT on 64-bit): no process anywhere has a larger PID, and
# the store's and the wire's 32-bit integers hold every PID up to it.
MAX_PID = 2**22


def parse_selector(selector: str) -> int | str:
    """All digits: a PID (an int); anything else: a tag (a str). A PID past MAX_PID is NotFound."""
    if not selector:
        raise InvalidRequest("selector is empty: pass a PID (digits) or a tag")
    if selector.isascii() and selector.isdigit():
        # Length first: int() of thousands of digits is slow, and refused past sys.get_int_max_str_digits.
        digits = selector.lstrip("0") or "0"
        if len(digits) > len(str(MAX_PID)) or int(digits) > MAX_PID:
            shown = selector if len(selector) <= 40 else f"{selector[:40]}... ({len(selector)} digits)"
            raise NotFound(f"no process {shown}: a PID is at most {MAX_PID} (a selector of digits is a PID)")
        return int(digits)
    # Checked here, not only at start: a NUL or an overlong text never reaches a lookup in the store.
    try:
        return check_tag(selector)
    except InvalidRequest as exc:
        raise InvalidRequest(f"selector is neither a PID (digits only) nor a tag: {exc}") from None


def check_id(value: str, *, what: str) -> str:
    """Returns an id (tag, capsule id, host id) when it keeps ID_RE, else raises InvalidRequest."""
    if not value:
        raise InvalidRequest(f"{what} is empty: {ID_RULE}")
    check_size(what, len(value), MAX_ID_CHARS, "characters")
    if not ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} {value[:80]!r} is malformed: {ID_RULE}")
    return value


def check_tag(tag: str) -> str:
    """Returns the tag when it keeps the rules, else raises InvalidRequest."""
    if tag.isascii() and tag.isdigit():
        raise InvalidRequest(f"tag {tag!r} is all digits, which selects a PID: add a letter")
    return check_id(tag, what="tag")


def new_tag() -> str:
    """A generated tag: proc- plus 8 hex digits."""
    return f"proc-{secrets.token_hex(4)}"


def check_timeout(timeout_sec: float | None, *, name: str = "timeoutSec") -> float | None:
    """Rejects negative or absurd timeouts; None passes through."""
    if timeout_sec is None:
        return None
    if math.isnan(timeout_sec):  # compares false with everything, so it would pass both checks below
        raise InvalidRequest(f"{name} is not a number: pass 0 or more seconds")
    if timeout_sec < 0:
        raise InvalidRequest(f"{name} is negative ({timeout_sec}): pass 0 or more seconds")
    if timeout_sec > MAX_TIMEOUT_SEC:
        raise InvalidRequest(f"{name} is over {MAX_TIMEOUT_SEC} seconds")
    return timeout_sec


def check_size(name: str, size: int, limit: int, unit: str = "bytes") -> None:
    """Raises InvalidRequest naming the value, its size and the limit when size is over the limit."""
    if size > limit:
        raise InvalidRequest(f"{name} has {size} {unit}; at most {limit} are allowed")


def _utf8_size(text: str) -> int:
    # A lone surrogate counts as the 3 bytes it would take; a later encode refuses it with its own error.
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The most one request may pass in a command, its environment and its input; INVALID_REQUEST past it.

    The defaults are Linux's own where it has one: a path holds at most 4096 bytes (PATH_MAX), an
    argument or NAME=value at most 131071 and its NUL (MAX_ARG_STRLEN, 128 KiB). A start past the
    kernel's limit on them all together (ARG_MAX) fails as INVALID_REQUEST "Argument list too long".
    """

    cmd_bytes: int = 4096
    args: int = 4096
    arg_bytes: int = 128 * 1024 - 1
    envs: int = 1024
    env_name_bytes: int = 256
    env_value_bytes: int = 128 * 1024 - 1
    cwd_bytes: int = 4096
    input_bytes: int = 1024 * 1024  # exec's stdin, and sendInput's data per call
    output_pattern_chars: int = 1024  # readiness.outputPattern


def check_command(
    *, cmd: str, args: Sequence[str], envs: Sequence[EnvVar], cwd: str | None, limits: InputLimits
) -> None:
    """Refuses a command, its arguments, environment or cwd past the limits or of the wrong shape."""
    check_size("cmd", _utf8_size(cmd), limits.cmd_bytes)
    check_cmd(cmd)
    check_size("args", len(args), limits.args, "items")
    for index, arg in enumerate(args):
        check_size(f"args[{index}]", _utf8_size(arg), limits.arg_bytes)
    check_size("envs", len(envs), limits.envs, "items")
    for index, var in enumerate(envs):
        check_size(f"envs[{index}].name", _utf8_size(var.name), limits.env_name_bytes)
        check_env_name(var.name)
        # The name, never the value, goes into the message: values hold secrets.
        check_size(f"envs[{index}].value (of {var.name})", _utf8_size(var.value), limits.env_value_bytes)
    if cwd is not None:
        check_size("cwd", _utf8_size(cwd), limits.cwd_bytes)


def check_env_name(name: str) -> str:
    """Returns an environment variable's name when it keeps ENV_NAME_RE, else raises InvalidRequest."""
    if not ENV_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"env name {name[:80]!r} is malformed: use letters, digits and _, not starting with a digit"
        )
    return name


def check_exec_spec(spec: ExecSpec, limits: InputLimits) -> ExecSpec:
    """Rejects a bad exec request before it reaches a host."""
    check_command(cmd=spec.cmd, args=spec.args, envs=spec.envs, cwd=spec.cwd, limits=limits)
    check_timeout(spec.timeout_sec)
    if spec.stdin is not None:
        check_size("stdin", len(spec.stdin), limits.input_bytes)
    return spec


def check_process_spec(spec: ProcessSpec, limits: InputLimits) -> ProcessSpec:
    """Rejects a bad start request before it reaches a host."""
    check_command(cmd=spec.cmd, args=spec.args, envs=spec.envs, cwd=spec.cwd, limits=limits)
    if spec.tag is not None:
        check_tag(spec.tag)
    check_timeout(spec.timeout_sec)
    if spec.restart is not None:
        check_restart(spec.restart)
    if spec.readiness is not None:
        check_readiness(spec.readiness, limits)
    if spec.terminal is not None:
        check_terminal_size(spec.terminal, prefix="terminal.")
    return spec


MAX_TERMINAL_SIZE = 1000


@dataclass(frozen=True, slots=True)
class TerminalSize:
    """Columns and rows of a pseudo-terminal."""

    cols: int = 80
    rows: int = 24


def check_terminal_size(size: TerminalSize, *, prefix: str = "") -> TerminalSize:
    """Rejects columns or rows outside 1 to MAX_TERMINAL_SIZE, naming the field (prefix + cols)."""
    for name, value in (("cols", size.cols), ("rows", size.rows)):
        if not 1 <= value <= MAX_TERMINAL_SIZE:
            raise InvalidRequest(f"{prefix}{name} is {value}: pass 1 to {MAX_TERMINAL_SIZE}")
    return size


def check_cmd(cmd: str) -> str:
    """Rejects an empty command or one with a NUL byte."""
    if not cmd.strip():
        raise InvalidRequest("cmd is empty: name a program, e.g. sh with args ['-c', '...']")
    if "\0" in cmd:
        raise InvalidRequest("cmd contains a NUL byte")
    return cmd


def signal_name(signum: signal.Signals | None) -> str | None:
    """The signal's name (SIGTERM), or None."""
    return None if signum is None else signum.name


def to_signal(number: int) -> signal.Signals | None:
    """A signal number as a Signals member; 0 or an unknown number is None."""
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def to_base64(data: bytes) -> str:
    """Bytes as base64 text."""
    return base64.b64encode(data).decode("ascii")


def encode_output(data: bytes) -> tuple[str, Encoding]:
    """Text for a GraphQL string field: UTF8 when the bytes are valid UTF-8, else BASE64."""
    try:
        return data.decode("utf-8"), Encoding.UTF8
    except UnicodeDecodeError:
        return to_base64(data), Encoding.BASE64


def decode_input(data: str, encoding: Encoding) -> bytes:
    """Bytes from text a caller sent in the given encoding."""
    if encoding is Encoding.UTF8:
        return data.encode("utf-8")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise InvalidRequest("data is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ExecSpec:
    """What to run to completion."""

    cmd: str
    args: Sequence[str] = ()
    envs: Sequence[EnvVar] = ()
    cwd: str | None = None
    stdin: bytes | None = None
    timeout_sec: float | None = None


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a command run to completion ended, and what it wrote."""

    stdout: bytes
    stderr: bytes
    # The exit status, or -N when signal N ended the command (then signal names it): the contract's
    # exitCode is non-null, and -N is what it has always said for a signal.
    exit_code: int
    signal: signal.Signals | None  # SIGKILL when the timeout ran out
    duration_ms: int
    timed_out: bool
    truncated: bool


class RestartPolicy(enum.Enum):
    """When a process is started again after it ends."""

    NEVER = "NEVER"
    ON_FAILURE = "ON_FAILURE"  # a non-zero exit, or a signal the service did not send
    ALWAYS = "ALWAYS"  # any end the service did not cause


# Past these a restart policy or a readiness check is a mistake, not a plan.
MAX_RESTARTS = 100_000
MIN_BACKOFF_SEC = 0.01  # no busy loop of spawns, whatever the policy
MAX_BACKOFF_SEC = 24 * 3600.0
PORT_RANGE = (1, 65535)


@dataclass(frozen=True, slots=True)
class RestartSpec:
    """A restart policy: backoff_sec before the first restart, doubling up to max_backoff_sec."""

    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_restarts: int | None = 5  # None: no limit
    backoff_sec: float = 1.0
    max_backoff_sec: float = 30.0


@dataclass(frozen=True, slots=True)
class ReadinessSpec:
    """Ready once port accepts TCP connections in the capsule, or once an output line matches."""

    port: int | None = None
    output_pattern: str | None = None
    timeout_sec: float = 60.0


def check_restart(restart: RestartSpec) -> RestartSpec:
    """Rejects negative or absurd restart counts and delays, naming the field."""
    if restart.max_restarts is not None and not 0 <= restart.max_restarts <= MAX_RESTARTS:
        raise InvalidRequest(
            f"restart.maxRestarts is {restart.max_restarts}: pass 0 to {MAX_RESTARTS}, or null for no limit"
        )
    for name, value in (("backoffSec", restart.backoff_sec), ("maxBackoffSec", restart.max_backoff_sec)):
        _check_range(f"restart.{name}", value, (MIN_BACKOFF_SEC, MAX_BACKOFF_SEC), "seconds")
    if restart.max_backoff_sec < restart.backoff_sec:
        raise InvalidRequest(
            f"restart.maxBackoffSec ({restart.max_backoff_sec}) is below restart.backoffSec "
            f"({restart.backoff_sec}): the delay only grows from backoffSec up to maxBackoffSec"
        )
    return restart


def check_readiness(readiness: ReadinessSpec, limits: InputLimits) -> ReadinessSpec:
    """Rejects a readiness check without exactly one of port and pattern, a port outside 1-65535,
    a pattern that is too long or no regular expression, or a bad timeout; names the field."""
    if (readiness.port is None) == (readiness.output_pattern is None):
        raise InvalidRequest("readiness needs exactly one of port and outputPattern")
    if readiness.port is not None:
        _check_range("readiness.port", readiness.port, PORT_RANGE, "(a TCP port)")
    if readiness.output_pattern is not None:
        pattern = readiness.output_pattern
        check_size("readiness.outputPattern", len(pattern), limits.output_pattern_chars, "characters")
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise InvalidRequest(
                f"readiness.outputPattern is not a valid regular expression: {exc}"
            ) from None
    if math.isnan(readiness.timeout_sec) or readiness.timeout_sec <= 0:
        raise InvalidRequest(f"readiness.timeoutSec is {readiness.timeout_sec}: pass 1 or more seconds")
    check_timeout(readiness.timeout_sec, name="readiness.timeoutSec")
    return readiness


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """What to start in the background."""

    cmd: str
    args: Sequence[str] = ()
    envs: Sequence[EnvVar] = ()
    cwd: str | None = None
    tag: str | None = None
    stdin: bool = False
    timeout_sec: float | None = None
    restart: RestartSpec | None = None  # None: never restarted
    readiness: ReadinessSpec | None = None  # None: ready once started
    terminal: TerminalSize | None = None  # on a new pseudo-terminal of this size; stdin implied


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the agent knows of one process."""

    capsule_id: str
    pid: int
    tag: str
    cmd: str
    args: tuple[str, ...]
    cwd: str
    status: ProcessStatus
    started_at: datetime
    exit_code: int | None = None
    signal: signal.Signals | None = None
    timed_out: bool = False
    ended_at: datetime | None = None
    stdin: bool = False
    terminal: bool = False
    restarts: int = 0  # runs after the first that the restart policy started; pid is the current run's
    ready: bool = True  # false until the current run passed its readiness check
    ready_at: datetime | None = None
    oom_killed: bool = False  # the kernel's OOM killer ended it
    # CPU and memory of the process and its children (the last run's totals once it has exited);
    # None where the runtime cannot measure it.
    usage: ResourceUsage | None = None


@dataclass(frozen=True, slots=True)
class Team:
    """A team: the caller every team service acts for."""

    id: int
    name: str


class CapsuleRuntime(enum.Enum):
    """Where a capsule's processes run."""

    SANDBOX = "SANDBOX"
    PLAIN = "PLAIN"


@dataclass(frozen=True, slots=True)
class CapsuleLimits:
    """What a capsule's processes may use together."""

    max_processes: int
    memory_mib: int | None = None
    cpus: float | None = None


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """CPU and memory, measured by the host's kernel."""

    cpu_sec: float
    memory_bytes: int
    memory_peak_bytes: int
    processes: int


@dataclass(frozen=True, slots=True)
class CapsuleSpec:
    """What a new capsule may reach and use."""

    network: bool = False
    limits: CapsuleLimits = CapsuleLimits(max_processes=256)


# Bounds of a capsule's limits. Fewer than 64 MiB leaves its sandbox's supervisor (an interpreter
# with gRPC, in the same cgroup) no room; past 1 TiB, or 64Ki processes, no host of ours has it to
# give. Below 0.01 cores, cgroup v1's CFS quota (1 ms a 100 ms period) cannot go; past 1024 a share
# means nothing, though one beyond the host's cores is harmless.
MAX_PROCESSES_RANGE = (1, 65536)
MEMORY_MIB_RANGE = (64, 1024 * 1024)
CPUS_RANGE = (0.01, 1024)


@dataclass(frozen=True, slots=True)
class RequestedLimits:
    """The limits a caller asks for; None: the server's default."""

    max_processes: int | None = None
    memory_mib: int | None = None
    cpus: float | None = None

    def over(self, defaults: CapsuleLimits) -> CapsuleLimits:
        """These limits, the defaults where none was asked for, checked."""
        return check_limits(
            CapsuleLimits(
                max_processes=defaults.max_processes if self.max_processes is None else self.max_processes,
                memory_mib=defaults.memory_mib if self.memory_mib is None else self.memory_mib,
                cpus=defaults.cpus if self.cpus is None else self.cpus,
            )
        )


def check_limits(limits: CapsuleLimits) -> CapsuleLimits:
    """Returns the limits when each is within its range, else raises InvalidRequest naming it."""
    _check_range("limits.maxProcesses", limits.max_processes, MAX_PROCESSES_RANGE, "processes")
    if limits.memory_mib is not None:
        _check_range("limits.memoryMiB", limits.memory_mib, MEMORY_MIB_RANGE, "MiB")
    if limits.cpus is not None:
        _check_range("limits.cpus", limits.cpus, CPUS_RANGE, "cores")
    return limits


def _check_range(name: str, value: float, bounds: tuple[float, float], unit: str) -> None:
    low, high = bounds
    # NaN compares false with everything: only `not low <= value <= high` refuses it.
    if not low <= value <= high:
        shown = "not a number" if math.isnan(value) else str(value)
        raise InvalidRequest(f"{name} is {shown}: pass {low} to {high} {unit}")


@dataclass(frozen=True, slots=True)
class HostCapsule:
    """What a host agent holds of one capsule."""

    capsule_id: str
    workspace: str
    running_processes: int = 0
    runtime: CapsuleRuntime = CapsuleRuntime.PLAIN
    network: bool = False
    limits: CapsuleLimits = CapsuleLimits(max_processes=256)
    usage: ResourceUsage | None = None


@dataclass(frozen=True, slots=True)
class CapsuleInfo:
    """A capsule as the store keeps it: whose it is, where it runs, its lifecycle state."""

    id: str
    team_id: int
    host_id: str
    status: CapsuleStatus
    timeout_sec: int
    created_at: datetime
    last_active_at: datetime
    runtime: CapsuleRuntime
    network: bool
    limits: CapsuleLimits

    @property
    def spec(self) -> CapsuleSpec:
        """What its host must create it with, the first time and whenever it gives it back."""
        return CapsuleSpec(network=self.network, limits=self.limits)


@dataclass(frozen=True, slots=True)
class OutputChunk:
    seq: int
    stream: Stream
    data: bytes


@dataclass(frozen=True, slots=True)
class OutputGap:
    """Events before seq were asked for but are no longer retained."""

    seq: int
    lost_events: int
    lost_bytes: int  # the output those events held

    @property
    def from_seq(self) -> int:
        """The first seq the gap covers: the one that was asked for."""
        return self.seq - self.lost_events


@dataclass(frozen=True, slots=True)
class ProcessExit:
    seq: int
    exit_code: int | None
    signal: signal.Signals | None
    timed_out: bool
    ended_at: datetime
    oom_killed: bool = False  # the kernel's OOM killer ended it (signal is SIGKILL then)


@dataclass(frozen=True, slots=True)
class ProcessRestarted:
    """The run before seq ended (exit_code or signal) and the restart policy started pid."""

    seq: int
    pid: int
    restarts: int
    exit_code: int | None
    signal: signal.Signals | None
    oom_killed: bool = False  # the kernel's OOM killer ended the run before (signal is SIGKILL then)


OutputEvent = OutputChunk | OutputGap | ProcessRestarted | ProcessExit


def merge_chunks(events: Sequence[OutputEvent], *, max_bytes: int) -> list[OutputEvent]:
    """Joins runs of neighbouring chunks of one stream, each run up to max_bytes of data.

    A merged chunk carries the seq of its last part, so resuming after it skips none of its bytes.
    A chunk that alone is max_bytes or more passes as it is. Each run is joined once, so n small
    chunks cost one copy of their bytes, not n.
    """
    merged: list[OutputEvent] = []
    run: list[OutputChunk] = []
    run_bytes = 0

    def close_run() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            merged.append(OutputChunk(run[-1].seq, run[0].stream, b"".join(c.data for c in run)))
        run.clear()

    for event in events:
        if not isinstance(event, OutputChunk):
            close_run()
            merged.append(event)
        elif run and run[0].stream is event.stream and run_bytes + len(event.data) <= max_bytes:
            run.append(event)
            run_bytes += len(event.data)
        else:
            close_run()
            run.append(event)
            run_bytes = len(event.data)
    close_run()
    return merged


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    kind: ProcessEventKind
    process: ProcessInfo


@dataclass(frozen=True, slots=True)
class CapsuleEvent:
    """A lifecycle event as its capsule's history keeps it: its place there (seq, and the cursor
    that names it to clients), when it happened, and the process as it was then."""

    seq: int
    kind: ProcessEventKind
    process: ProcessInfo
    at: datetime
    cursor: str


@dataclass(frozen=True, slots=True)
class EventRetention:
    """How much of each capsule's event history the store keeps: events younger than max_age_sec,
    and at most the newest max_per_capsule of them."""

    max_age_sec: float = 24 * 3600.0
    max_per_capsule: int = 10_000

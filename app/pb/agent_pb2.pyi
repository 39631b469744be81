import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CapsuleRuntime(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_UNSPECIFIED: _ClassVar[CapsuleRuntime]
    RUNTIME_SANDBOX: _ClassVar[CapsuleRuntime]
    RUNTIME_PLAIN: _ClassVar[CapsuleRuntime]

class ProcessStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_STATUS_UNSPECIFIED: _ClassVar[ProcessStatus]
    PROCESS_RUNNING: _ClassVar[ProcessStatus]
    PROCESS_EXITED: _ClassVar[ProcessStatus]

class SignalScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_GROUP: _ClassVar[SignalScope]
    SCOPE_PROCESS: _ClassVar[SignalScope]

class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STDOUT: _ClassVar[Stream]
    STDERR: _ClassVar[Stream]

class ProcessEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESS_EVENT_KIND_UNSPECIFIED: _ClassVar[ProcessEventKind]
    EVENT_STARTED: _ClassVar[ProcessEventKind]
    EVENT_EXITED: _ClassVar[ProcessEventKind]
    EVENT_READY: _ClassVar[ProcessEventKind]
    EVENT_RESTARTED: _ClassVar[ProcessEventKind]
RUNTIME_UNSPECIFIED: CapsuleRuntime
RUNTIME_SANDBOX: CapsuleRuntime
RUNTIME_PLAIN: CapsuleRuntime
PROCESS_STATUS_UNSPECIFIED: ProcessStatus
PROCESS_RUNNING: ProcessStatus
PROCESS_EXITED: ProcessStatus
SCOPE_GROUP: SignalScope
SCOPE_PROCESS: SignalScope
STDOUT: Stream
STDERR: Stream
PROCESS_EVENT_KIND_UNSPECIFIED: ProcessEventKind
EVENT_STARTED: ProcessEventKind
EVENT_EXITED: ProcessEventKind
EVENT_READY: ProcessEventKind
EVENT_RESTARTED: ProcessEventKind

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapsuleRef(_message.Message):
    __slots__ = ("capsule_id",)
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    def __init__(self, capsule_id: _Optional[str] = ...) -> None: ...

class CapsuleLimits(_message.Message):
    __slots__ = ("max_processes", "memory_mib", "cpus")
    MAX_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    max_processes: int
    memory_mib: int
    cpus: float
    def __init__(self, max_processes: _Optional[int] = ..., memory_mib: _Optional[int] = ..., cpus: _Optional[float] = ...) -> None: ...

class CreateCapsuleRequest(_message.Message):
    __slots__ = ("capsule_id", "network", "limits")
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    network: bool
    limits: CapsuleLimits
    def __init__(self, capsule_id: _Optional[str] = ..., network: _Optional[bool] = ..., limits: _Optional[_Union[CapsuleLimits, _Mapping]] = ...) -> None: ...

class ResourceUsage(_message.Message):
    __slots__ = ("cpu_sec", "memory_bytes", "memory_peak_bytes", "processes")
    CPU_SEC_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    cpu_sec: float
    memory_bytes: int
    memory_peak_bytes: int
    processes: int
    def __init__(self, cpu_sec: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., processes: _Optional[int] = ...) -> None: ...

class CapsuleInfo(_message.Message):
    __slots__ = ("capsule_id", "workspace", "running_processes", "runtime", "network", "limits", "usage")
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    workspace: str
    running_processes: int
    runtime: CapsuleRuntime
    network: bool
    limits: CapsuleLimits
    usage: ResourceUsage
    def __init__(self, capsule_id: _Optional[str] = ..., workspace: _Optional[str] = ..., running_processes: _Optional[int] = ..., runtime: _Optional[_Union[CapsuleRuntime, str]] = ..., network: _Optional[bool] = ..., limits: _Optional[_Union[CapsuleLimits, _Mapping]] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ...) -> None: ...

class CapsuleList(_message.Message):
    __slots__ = ("capsules",)
    CAPSULES_FIELD_NUMBER: _ClassVar[int]
    capsules: _containers.RepeatedCompositeFieldContainer[CapsuleInfo]
    def __init__(self, capsules: _Optional[_Iterable[_Union[CapsuleInfo, _Mapping]]] = ...) -> None: ...

class ProcessRef(_message.Message):
    __slots__ = ("capsule_id", "selector")
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    selector: str
    def __init__(self, capsule_id: _Optional[str] = ..., selector: _Optional[str] = ...) -> None: ...

class EnvVar(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("capsule_id", "cmd", "args", "envs", "cwd", "stdin", "timeout_sec")
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENVS_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SEC_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    cmd: str
    args: _containers.RepeatedScalarFieldContainer[str]
    envs: _containers.RepeatedCompositeFieldContainer[EnvVar]
    cwd: str
    stdin: bytes
    timeout_sec: float
    def __init__(self, capsule_id: _Optional[str] = ..., cmd: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., envs: _Optional[_Iterable[_Union[EnvVar, _Mapping]]] = ..., cwd: _Optional[str] = ..., stdin: _Optional[bytes] = ..., timeout_sec: _Optional[float] = ...) -> None: ...

class ExecReply(_message.Message):
    __slots__ = ("stdout", "stderr", "exit_code", "duration_ms", "timed_out", "truncated", "signal")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    stdout: bytes
    stderr: bytes
    exit_code: int
    duration_ms: int
    timed_out: bool
    truncated: bool
    signal: int
    def __init__(self, stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., exit_code: _Optional[int] = ..., duration_ms: _Optional[int] = ..., timed_out: _Optional[bool] = ..., truncated: _Optional[bool] = ..., signal: _Optional[int] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("capsule_id", "cmd", "args", "envs", "cwd", "tag", "stdin", "timeout_sec", "max_running", "restart", "readiness", "terminal")
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENVS_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SEC_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    READINESS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    cmd: str
    args: _containers.RepeatedScalarFieldContainer[str]
    envs: _containers.RepeatedCompositeFieldContainer[EnvVar]
    cwd: str
    tag: str
    stdin: bool
    timeout_sec: float
    max_running: int
    restart: RestartPolicy
    readiness: Readiness
    terminal: TerminalSize
    def __init__(self, capsule_id: _Optional[str] = ..., cmd: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., envs: _Optional[_Iterable[_Union[EnvVar, _Mapping]]] = ..., cwd: _Optional[str] = ..., tag: _Optional[str] = ..., stdin: _Optional[bool] = ..., timeout_sec: _Optional[float] = ..., max_running: _Optional[int] = ..., restart: _Optional[_Union[RestartPolicy, _Mapping]] = ..., readiness: _Optional[_Union[Readiness, _Mapping]] = ..., terminal: _Optional[_Union[TerminalSize, _Mapping]] = ...) -> None: ...

class TerminalSize(_message.Message):
    __slots__ = ("cols", "rows")
    COLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    cols: int
    rows: int
    def __init__(self, cols: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class RestartPolicy(_message.Message):
    __slots__ = ("policy", "max_restarts", "backoff_sec", "max_backoff_sec")
    class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NEVER: _ClassVar[RestartPolicy.Policy]
        ON_FAILURE: _ClassVar[RestartPolicy.Policy]
        ALWAYS: _ClassVar[RestartPolicy.Policy]
    NEVER: RestartPolicy.Policy
    ON_FAILURE: RestartPolicy.Policy
    ALWAYS: RestartPolicy.Policy
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_SEC_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_SEC_FIELD_NUMBER: _ClassVar[int]
    policy: RestartPolicy.Policy
    max_restarts: int
    backoff_sec: float
    max_backoff_sec: float
    def __init__(self, policy: _Optional[_Union[RestartPolicy.Policy, str]] = ..., max_restarts: _Optional[int] = ..., backoff_sec: _Optional[float] = ..., max_backoff_sec: _Optional[float] = ...) -> None: ...

class Readiness(_message.Message):
    __slots__ = ("port", "output_pattern", "timeout_sec")
    PORT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATTERN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SEC_FIELD_NUMBER: _ClassVar[int]
    port: int
    output_pattern: str
    timeout_sec: float
    def __init__(self, port: _Optional[int] = ..., output_pattern: _Optional[str] = ..., timeout_sec: _Optional[float] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("capsule_id", "pid", "tag", "cmd", "args", "cwd", "status", "exit_code", "signal", "timed_out", "started_at", "ended_at", "stdin", "restarts", "ready", "ready_at", "terminal", "usage", "oom_killed")
    CAPSULE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    capsule_id: str
    pid: int
    tag: str
    cmd: str
    args: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    status: ProcessStatus
    exit_code: int
    signal: int
    timed_out: bool
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    stdin: bool
    restarts: int
    ready: bool
    ready_at: _timestamp_pb2.Timestamp
    terminal: bool
    usage: ResourceUsage
    oom_killed: bool
    def __init__(self, capsule_id: _Optional[str] = ..., pid: _Optional[int] = ..., tag: _Optional[str] = ..., cmd: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., status: _Optional[_Union[ProcessStatus, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stdin: _Optional[bool] = ..., restarts: _Optional[int] = ..., ready: _Optional[bool] = ..., ready_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., terminal: _Optional[bool] = ..., usage: _Optional[_Union[ResourceUsage, _Mapping]] = ..., oom_killed: _Optional[bool] = ...) -> None: ...

class ProcessList(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ...) -> None: ...

class SignalRequest(_message.Message):
    __slots__ = ("process", "signal", "scope")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    signal: int
    scope: SignalScope
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., signal: _Optional[int] = ..., scope: _Optional[_Union[SignalScope, str]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("process", "grace_sec")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    GRACE_SEC_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    grace_sec: float
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., grace_sec: _Optional[float] = ...) -> None: ...

class ResizeRequest(_message.Message):
    __slots__ = ("process", "size")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    size: TerminalSize
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., size: _Optional[_Union[TerminalSize, _Mapping]] = ...) -> None: ...

class InputRequest(_message.Message):
    __slots__ = ("process", "data")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    data: bytes
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OutputRequest(_message.Message):
    __slots__ = ("process", "from_seq")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    process: ProcessRef
    from_seq: int
    def __init__(self, process: _Optional[_Union[ProcessRef, _Mapping]] = ..., from_seq: _Optional[int] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("seq", "stream", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    stream: Stream
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., stream: _Optional[_Union[Stream, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OutputGap(_message.Message):
    __slots__ = ("seq", "lost_events", "lost_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LOST_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    lost_events: int
    lost_bytes: int
    def __init__(self, seq: _Optional[int] = ..., lost_events: _Optional[int] = ..., lost_bytes: _Optional[int] = ...) -> None: ...

class ProcessRestarted(_message.Message):
    __slots__ = ("seq", "pid", "restarts", "exit_code", "signal", "oom_killed")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    pid: int
    restarts: int
    exit_code: int
    signal: int
    oom_killed: bool
    def __init__(self, seq: _Optional[int] = ..., pid: _Optional[int] = ..., restarts: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., oom_killed: _Optional[bool] = ...) -> None: ...

class ProcessExit(_message.Message):
    __slots__ = ("seq", "exit_code", "signal", "timed_out", "ended_at", "oom_killed")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    exit_code: int
    signal: int
    timed_out: bool
    ended_at: _timestamp_pb2.Timestamp
    oom_killed: bool
    def __init__(self, seq: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., timed_out: _Optional[bool] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., oom_killed: _Optional[bool] = ...) -> None: ...

class OutputEvent(_message.Message):
    __slots__ = ("chunk", "gap", "exit", "restarted")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    RESTARTED_FIELD_NUMBER: _ClassVar[int]
    chunk: OutputChunk
    gap: OutputGap
    exit: ProcessExit
    restarted: ProcessRestarted
    def __init__(self, chunk: _Optional[_Union[OutputChunk, _Mapping]] = ..., gap: _Optional[_Union[OutputGap, _Mapping]] = ..., exit: _Optional[_Union[ProcessExit, _Mapping]] = ..., restarted: _Optional[_Union[ProcessRestarted, _Mapping]] = ...) -> None: ...

class OutputBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[OutputEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[OutputEvent, _Mapping]]] = ...) -> None: ...

class ProcessEvent(_message.Message):
    __slots__ = ("kind", "process")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    kind: ProcessEventKind
    process: ProcessInfo
    def __init__(self, kind: _Optional[_Union[ProcessEventKind, str]] = ..., process: _Optional[_Union[ProcessInfo, _Mapping]] = ...) -> None: ...

class OutputCounters(_message.Message):
    __slots__ = ("pipe_bytes", "log_bytes_held", "evicted_events", "evicted_bytes")
    PIPE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOG_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    EVICTED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    pipe_bytes: int
    log_bytes_held: int
    evicted_events: int
    evicted_bytes: int
    def __init__(self, pipe_bytes: _Optional[int] = ..., log_bytes_held: _Optional[int] = ..., evicted_events: _Optional[int] = ..., evicted_bytes: _Optional[int] = ...) -> None: ...

"""Conversions between the agent's protobuf messages and domain values, written once."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from app import domain
from app.pb import agent_pb2 as pb

_STATUS_TO_PB = {
    domain.ProcessStatus.RUNNING: pb.PROCESS_RUNNING,
    domain.ProcessStatus.EXITED: pb.PROCESS_EXITED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_STREAM_TO_PB = {domain.Stream.STDOUT: pb.STDOUT, domain.Stream.STDERR: pb.STDERR}
_STREAM_FROM_PB = {v: k for k, v in _STREAM_TO_PB.items()}
_SCOPE_TO_PB = {domain.SignalScope.GROUP: pb.SCOPE_GROUP, domain.SignalScope.PROCESS: pb.SCOPE_PROCESS}
_SCOPE_FROM_PB: dict[int, domain.SignalScope] = {v: k for k, v in _SCOPE_TO_PB.items()}
_KIND_TO_PB = {
    domain.ProcessEventKind.STARTED: pb.EVENT_STARTED,
    domain.ProcessEventKind.EXITED: pb.EVENT_EXITED,
    domain.ProcessEventKind.READY: pb.EVENT_READY,
    domain.ProcessEventKind.RESTARTED: pb.EVENT_RESTARTED,
}
_POLICY_TO_PB = {
    domain.RestartPolicy.NEVER: pb.RestartPolicy.NEVER,
    domain.RestartPolicy.ON_FAILURE: pb.RestartPolicy.ON_FAILURE,
    domain.RestartPolicy.ALWAYS: pb.RestartPolicy.ALWAYS,
}
_POLICY_FROM_PB = {v: k for k, v in _POLICY_TO_PB.items()}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def moment(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _signal_to_pb(signum: signal.Signals | None) -> int:
    return 0 if signum is None else int(signum)  # 0: no signal, as domain.to_signal reads it


def envs_to_pb(envs: Iterable[domain.EnvVar]) -> list[pb.EnvVar]:
    return [pb.EnvVar(name=e.name, value=e.value) for e in envs]


def envs_from_pb(envs: Iterable[pb.EnvVar]) -> tuple[domain.EnvVar, ...]:
    return tuple(domain.EnvVar(name=e.name, value=e.value) for e in envs)


def process_ref(capsule_id: str, selector: str) -> pb.ProcessRef:
    return pb.ProcessRef(capsule_id=capsule_id, selector=selector)


def _command_to_pb(capsule_id: str, spec: domain.ExecSpec | domain.ProcessSpec) -> dict[str, Any]:
    """The fields every request that runs a command has."""
    return {
        "capsule_id": capsule_id,
        "cmd": spec.cmd,
        "args": list(spec.args),
        "envs": envs_to_pb(spec.envs),
        "cwd": spec.cwd or "",
    }


def _command(request: pb.ExecRequest | pb.StartRequest) -> dict[str, Any]:
    return {
        "cmd": request.cmd,
        "args": tuple(request.args),
        "envs": envs_from_pb(request.envs),
        "cwd": request.cwd or None,
    }


def exec_request(capsule_id: str, spec: domain.ExecSpec) -> pb.ExecRequest:
    request = pb.ExecRequest(**_command_to_pb(capsule_id, spec), timeout_sec=spec.timeout_sec or 0.0)
    if spec.stdin is not None:
        request.stdin = spec.stdin
    return request


def exec_spec(request: pb.ExecRequest) -> domain.ExecSpec:
    return domain.ExecSpec(
        **_command(request),
        stdin=request.stdin if request.HasField("stdin") else None,
        timeout_sec=request.timeout_sec or None,
    )


def exec_reply(result: domain.ExecResult) -> pb.ExecReply:
    return pb.ExecReply(
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        signal=_signal_to_pb(result.signal),
        duration_ms=result.duration_ms,
        timed_out=result.timed_out,
        truncated=result.truncated,
    )


def exec_result(reply: pb.ExecReply) -> domain.ExecResult:
    return domain.ExecResult(
        stdout=reply.stdout,
        stderr=reply.stderr,
        exit_code=reply.exit_code,
        signal=domain.to_signal(reply.signal),
        duration_ms=reply.duration_ms,
        timed_out=reply.timed_out,
        truncated=reply.truncated,
    )


def start_request(capsule_id: str, spec: domain.ProcessSpec, *, max_running: int) -> pb.StartRequest:
    request = pb.StartRequest(
        **_command_to_pb(capsule_id, spec), tag=spec.tag or "", stdin=spec.stdin, max_running=max_running
    )
    if spec.timeout_sec is not None:
        request.timeout_sec = spec.timeout_sec
    if spec.terminal is not None:
        request.terminal.CopyFrom(terminal_size_to_pb(spec.terminal))
    if spec.restart is not None:
        _fill_restart(request.restart, spec.restart)
    if spec.readiness is not None:
        _fill_readiness(request.readiness, spec.readiness)
    return request


def _fill_restart(message: pb.RestartPolicy, restart: domain.RestartSpec) -> None:
    message.policy = _POLICY_TO_PB[restart.policy]
    message.backoff_sec, message.max_backoff_sec = restart.backoff_sec, restart.max_backoff_sec
    if restart.max_restarts is not None:
        message.max_restarts = restart.max_restarts


def _restart(message: pb.RestartPolicy) -> domain.RestartSpec:
    return domain.RestartSpec(
        policy=_POLICY_FROM_PB.get(message.policy, domain.RestartPolicy.NEVER),
        max_restarts=message.max_restarts if message.HasField("max_restarts") else None,
        backoff_sec=message.backoff_sec,
        max_backoff_sec=message.max_backoff_sec,
    )


def _fill_readiness(message: pb.Readiness, readiness: domain.ReadinessSpec) -> None:
    message.timeout_sec = readiness.timeout_sec
    if readiness.port is not None:
        message.port = readiness.port
    if readiness.output_pattern is not None:
        message.output_pattern = readiness.output_pattern


def _readiness(message: pb.Readiness) -> domain.ReadinessSpec:
    return domain.ReadinessSpec(
        port=message.port if message.HasField("port") else None,
        output_pattern=message.output_pattern if message.HasField("output_pattern") else None,
        timeout_sec=message.timeout_sec,
    )


def terminal_size_to_pb(size: domain.TerminalSize) -> pb.TerminalSize:
    return pb.TerminalSize(cols=size.cols, rows=size.rows)


def terminal_size(message: pb.TerminalSize) -> domain.TerminalSize:
    return domain.TerminalSize(cols=message.cols, rows=message.rows)


def process_spec(request: pb.StartRequest) -> domain.ProcessSpec:
    return domain.ProcessSpec(
        **_command(request),
        tag=request.tag or None,
        stdin=request.stdin,
        timeout_sec=request.timeout_sec if request.HasField("timeout_sec") else None,
        terminal=terminal_size(request.terminal) if request.HasField("terminal") else None,
        restart=_restart(request.restart) if request.HasField("restart") else None,
        readiness=_readiness(request.readiness) if request.HasField("readiness") else None,
    )


def process_info_to_pb(info: domain.ProcessInfo) -> pb.ProcessInfo:
    message = pb.ProcessInfo(
        capsule_id=info.capsule_id,
        pid=info.pid,
        tag=info.tag,
        cmd=info.cmd,
        args=info.args,
        cwd=info.cwd,
        status=_STATUS_TO_PB[info.status],
        signal=_signal_to_pb(info.signal),
        timed_out=info.timed_out,
        started_at=timestamp(info.started_at),
        stdin=info.stdin,
        terminal=info.terminal,
        restarts=info.restarts,
        ready=info.ready,
    )
    if info.ready_at is not None:
        message.ready_at.CopyFrom(timestamp(info.ready_at))
    if info.exit_code is not None:
        message.exit_code = info.exit_code
    if info.ended_at is not None:
        message.ended_at.CopyFrom(timestamp(info.ended_at))
    message.oom_killed = info.oom_killed
    if info.usage is not None:
        _fill_usage(message.usage, info.usage)
    return message


def process_info(message: pb.ProcessInfo) -> domain.ProcessInfo:
    return domain.ProcessInfo(
        capsule_id=message.capsule_id,
        pid=message.pid,
        tag=message.tag,
        cmd=message.cmd,
        args=tuple(message.args),
        cwd=message.cwd,
        status=_STATUS_FROM_PB[message.status],
        started_at=moment(message.started_at),
        exit_code=message.exit_code if message.HasField("exit_code") else None,
        signal=domain.to_signal(message.signal),
        timed_out=message.timed_out,
        ended_at=moment(message.ended_at) if message.HasField("ended_at") else None,
        stdin=message.stdin,
        terminal=message.terminal,
        restarts=message.restarts,
        ready=message.ready,
        ready_at=moment(message.ready_at) if message.HasField("ready_at") else None,
        oom_killed=message.oom_killed,
        usage=resource_usage(message.usage) if message.HasField("usage") else None,
    )


def _fill_usage(message: pb.ResourceUsage, usage: domain.ResourceUsage) -> None:
    message.cpu_sec, message.processes = usage.cpu_sec, usage.processes
    message.memory_bytes, message.memory_peak_bytes = usage.memory_bytes, usage.memory_peak_bytes


def resource_usage(message: pb.ResourceUsage) -> domain.ResourceUsage:
    return domain.ResourceUsage(
        cpu_sec=message.cpu_sec,
        memory_bytes=message.memory_bytes,
        memory_peak_bytes=message.memory_peak_bytes,
        processes=message.processes,
    )


_RUNTIME_TO_PB = {
    domain.CapsuleRuntime.SANDBOX: pb.RUNTIME_SANDBOX,
    domain.CapsuleRuntime.PLAIN: pb.RUNTIME_PLAIN,
}
_RUNTIME_FROM_PB = {v: k for k, v in _RUNTIME_TO_PB.items()}


def limits_to_pb(limits: domain.CapsuleLimits) -> pb.CapsuleLimits:
    message = pb.CapsuleLimits(max_processes=limits.max_processes)
    if limits.memory_mib is not None:
        message.memory_mib = limits.memory_mib
    if limits.cpus is not None:
        message.cpus = limits.cpus
    return message


def limits(message: pb.CapsuleLimits) -> domain.CapsuleLimits:
    return domain.CapsuleLimits(
        max_processes=message.max_processes,
        memory_mib=message.memory_mib if message.HasField("memory_mib") else None,
        cpus=message.cpus if message.HasField("cpus") else None,
    )


def create_capsule_request(capsule_id: str, spec: domain.CapsuleSpec) -> pb.CreateCapsuleRequest:
    return pb.CreateCapsuleRequest(
        capsule_id=capsule_id, network=spec.network, limits=limits_to_pb(spec.limits)
    )


def capsule_spec(request: pb.CreateCapsuleRequest) -> domain.CapsuleSpec:
    return domain.CapsuleSpec(network=request.network, limits=limits(request.limits))


def capsule_info_to_pb(info: domain.HostCapsule) -> pb.CapsuleInfo:
    message = pb.CapsuleInfo(
        capsule_id=info.capsule_id,
        workspace=info.workspace,
        running_processes=info.running_processes,
        runtime=_RUNTIME_TO_PB[info.runtime],
        network=info.network,
        limits=limits_to_pb(info.limits),
    )
    if info.usage is not None:
        _fill_usage(message.usage, info.usage)
    return message


def capsule_info(message: pb.CapsuleInfo) -> domain.HostCapsule:
    return domain.HostCapsule(
        capsule_id=message.capsule_id,
        workspace=message.workspace,
        running_processes=message.running_processes,
        runtime=_RUNTIME_FROM_PB.get(message.runtime, domain.CapsuleRuntime.PLAIN),
        network=message.network,
        limits=limits(message.limits),
        usage=resource_usage(message.usage) if message.HasField("usage") else None,
    )


def signal_scope_to_pb(scope: domain.SignalScope) -> int:
    return _SCOPE_TO_PB[scope]


def signal_scope(value: int) -> domain.SignalScope:
    return _SCOPE_FROM_PB[value]


def _fill_output_event(message: pb.OutputEvent, event: domain.OutputEvent) -> None:
    # Filled in place: building a sub-message and passing it in would copy its bytes once more.
    match event:
        case domain.OutputChunk(seq=seq, stream=stream, data=data):
            chunk = message.chunk
            chunk.seq, chunk.stream, chunk.data = seq, _STREAM_TO_PB[stream], data
        case domain.OutputGap():
            gap = message.gap
            gap.seq, gap.lost_events, gap.lost_bytes = event.seq, event.lost_events, event.lost_bytes
        case domain.ProcessExit():
            end = message.exit
            end.seq = event.seq
            end.signal = _signal_to_pb(event.signal)
            end.timed_out, end.oom_killed = event.timed_out, event.oom_killed
            end.ended_at.CopyFrom(timestamp(event.ended_at))
            if event.exit_code is not None:
                end.exit_code = event.exit_code
        case domain.ProcessRestarted():
            restarted = message.restarted
            restarted.seq, restarted.pid, restarted.restarts = event.seq, event.pid, event.restarts
            restarted.signal, restarted.oom_killed = _signal_to_pb(event.signal), event.oom_killed
            if event.exit_code is not None:
                restarted.exit_code = event.exit_code


def output_event_to_pb(event: domain.OutputEvent) -> pb.OutputEvent:
    message = pb.OutputEvent()
    _fill_output_event(message, event)
    return message


def output_batch(events: Sequence[domain.OutputEvent]) -> pb.OutputBatch:
    batch = pb.OutputBatch()
    for event in events:
        _fill_output_event(batch.events.add(), event)
    return batch


# The tags of the fields serialized_output_batch writes: (field number << 3) | wire type.
_EVENTS_TAG = _CHUNK_TAG = b"\x0a"  # OutputBatch.events, OutputEvent.chunk: length-delimited
_SEQ_TAG, _STREAM_TAG, _DATA_TAG = b"\x08", b"\x10", b"\x1a"  # OutputChunk's seq, stream, data


def _varint(value: int) -> bytes:
    value &= 0xFFFF_FFFF_FFFF_FFFF  # a negative int64 takes ten bytes, as protobuf writes it
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def serialized_output_batch(events: Sequence[domain.OutputEvent]) -> bytes:
    """output_batch(events).SerializeToString(), byte for byte, with each chunk's data copied once.

    Through protobuf, the data is copied into the message, then twice more as it is serialized (into
    the encoder's growing buffer, then into the bytes returned); here it is joined once with the
    fields' tags and lengths. A capsule's supervisor sends its output to the agent so.
    """
    pieces: list[bytes] = []
    for event in events:
        if type(event) is domain.OutputChunk:
            head = (_SEQ_TAG + _varint(event.seq) if event.seq else b"") + (
                _STREAM_TAG + _varint(stream) if (stream := _STREAM_TO_PB[event.stream]) else b""
            )
            data = event.data
            if data:
                head += _DATA_TAG + _varint(len(data))
            chunk = len(head) + len(data)
            chunk_length = _varint(chunk)
            pieces += (
                _EVENTS_TAG
                + _varint(len(_CHUNK_TAG) + len(chunk_length) + chunk)
                + _CHUNK_TAG
                + chunk_length
                + head,
                data,
            )
        else:
            body = output_event_to_pb(event).SerializeToString()
            pieces += (_EVENTS_TAG + _varint(len(body)), body)
    return b"".join(pieces)


def output_event(message: pb.OutputEvent) -> domain.OutputEvent:
    which = message.WhichOneof("event")
    if which == "chunk":
        chunk = message.chunk
        return domain.OutputChunk(seq=chunk.seq, stream=_STREAM_FROM_PB[chunk.stream], data=chunk.data)
    if which == "gap":
        gap = message.gap
        return domain.OutputGap(seq=gap.seq, lost_events=gap.lost_events, lost_bytes=gap.lost_bytes)
    if which == "restarted":
        restarted = message.restarted
        return domain.ProcessRestarted(
            seq=restarted.seq,
            pid=restarted.pid,
            restarts=restarted.restarts,
            exit_code=restarted.exit_code if restarted.HasField("exit_code") else None,
            signal=domain.to_signal(restarted.signal),
            oom_killed=restarted.oom_killed,
        )
    end = message.exit
    return domain.ProcessExit(
        seq=end.seq,
        exit_code=end.exit_code if end.HasField("exit_code") else None,
        signal=domain.to_signal(end.signal),
        timed_out=end.timed_out,
        ended_at=moment(end.ended_at),
        oom_killed=end.oom_killed,
    )


def output_events(batch: pb.OutputBatch) -> list[domain.OutputEvent]:
    return [output_event(e) for e in batch.events]


def process_event_to_pb(event: domain.ProcessEvent) -> pb.ProcessEvent:
    return pb.ProcessEvent(kind=_KIND_TO_PB[event.kind], process=process_info_to_pb(event.process))


def process_event(message: pb.ProcessEvent) -> domain.ProcessEvent:
    return domain.ProcessEvent(kind=_KIND_FROM_PB[message.kind], process=process_info(message.process))

"""The ProcessOutputEvent union and processOutput."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated, TypeAlias

import strawberry
from strawberry import ID

from app import domain
from app.api.auth import team_subscription
from app.api.context import Info
from app.api.enums import Encoding, OutputStream, Signal
from app.api.sharing import shareable


@strawberry.type(description="Bytes the process wrote, in the order the host agent read them.")
class OutputChunk:
    seq: int
    stream: OutputStream
    data: str
    encoding: Encoding


@strawberry.type(description="Events before seq were asked for but are no longer retained.")
class OutputGap:
    seq: int
    lost_events: int
    # A Float: byte counts pass 2^31 and GraphQL's Int is 32 bits; a double is exact up to 2^53.
    lost_bytes: float = strawberry.field(description="How many bytes of output those events held.")


@strawberry.type(
    description="The run ended and the restart policy started the process again; "
    "the stream goes on with the new run's output."
)
class ProcessRestarted:
    seq: int
    pid: int = strawberry.field(description="The new run's pid.")
    restarts: int
    exit_code: int | None = strawberry.field(description="How the previous run ended.")
    signal: Signal | None
    oom_killed: bool = False


@strawberry.type(
    description="The last event of a stream, sent only once the process has really ended "
    "(never for a stream that merely closed)."
)
class ProcessExited:
    seq: int
    exit_code: int | None
    signal: Signal | None
    timed_out: bool
    ended_at: datetime
    oom_killed: bool


ProcessOutputEvent: TypeAlias = Annotated[
    OutputChunk | OutputGap | ProcessRestarted | ProcessExited, strawberry.union("ProcessOutputEvent")
]


shareable(OutputChunk, lambda chunk: len(chunk.data))
shareable(OutputGap)
shareable(ProcessRestarted)
shareable(ProcessExited)

GraphQLOutputEvent: TypeAlias = OutputChunk | OutputGap | ProcessRestarted | ProcessExited

# The fan-out hands every subscriber of a process the same event objects: each is converted once,
# and its subscribers then share one object, which the executor can share results for.
# Recent events are kept, up to a count and about a size of output between them (the newest one
# whatever its size): enough for subscribers reading the same event at about the same time.
_CONVERTED_KEPT = 64
_CONVERTED_BYTES = 4 * 1024 * 1024
_converted: OrderedDict[int, tuple[domain.OutputEvent, GraphQLOutputEvent, int]] = OrderedDict()
_converted_bytes = 0


def to_graphql(event: domain.OutputEvent) -> GraphQLOutputEvent:
    """One domain output event as its GraphQL type; the same object for the same recent event."""
    global _converted_bytes  # noqa: PLW0603
    key = id(event)
    kept = _converted.get(key)
    if kept is not None and kept[0] is event:
        return kept[1]
    converted = _convert(event)
    size = len(event.data) if isinstance(event, domain.OutputChunk) else 64
    if key in _converted:  # an event since dropped had this id
        _converted_bytes -= _converted.pop(key)[2]
    _converted[key] = (event, converted, size)  # holding the event keeps its id from being reused
    _converted_bytes += size
    while len(_converted) > 1 and (len(_converted) > _CONVERTED_KEPT or _converted_bytes > _CONVERTED_BYTES):
        _converted_bytes -= _converted.popitem(last=False)[1][2]
    return converted


def _convert(event: domain.OutputEvent) -> GraphQLOutputEvent:
    match event:
        case domain.OutputChunk():
            data, encoding = domain.encode_output(event.data)
            return OutputChunk(seq=event.seq, stream=event.stream, data=data, encoding=encoding)
        case domain.OutputGap():
            return OutputGap(seq=event.seq, lost_events=event.lost_events, lost_bytes=event.lost_bytes)
        case domain.ProcessRestarted():
            return ProcessRestarted(
                seq=event.seq,
                pid=event.pid,
                restarts=event.restarts,
                exit_code=event.exit_code,
                signal=Signal.of(event.signal),
                oom_killed=event.oom_killed,
            )
        case domain.ProcessExit():
            return ProcessExited(
                seq=event.seq,
                exit_code=event.exit_code,
                signal=Signal.of(event.signal),
                timed_out=event.timed_out,
                ended_at=event.ended_at,
                oom_killed=event.oom_killed,
            )


@strawberry.type
class OutputSubscription:
    @team_subscription(
        description="Replays retained output from fromSeq (0 = all retained), then follows live output; "
        "ends after ProcessExited."
    )
    async def process_output(
        self, info: Info, capsule_id: ID, selector: str, from_seq: int = 0
    ) -> AsyncGenerator[ProcessOutputEvent, None]:
        # A multiplexed group's context notes each event it executes (api/multiplex.py reads its seq).
        track = getattr(info.context, "track_output", None)
        async for event in info.context.services.output.follow(capsule_id, selector, from_seq):
            if track is not None:
                track(event)
            yield to_graphql(event)

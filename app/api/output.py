"""The ProcessOutputEvent union and processOutput."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated, TypeAlias

import strawberry
from strawberry import ID

from app import domain
from app.api.auth import team_subscription
from app.api.context import Info
from app.api.enums import Encoding, OutputStream, Signal


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
    description="The last event of a stream, sent only once the process has really ended "
    "(never for a stream that merely closed)."
)
class ProcessExited:
    seq: int
    exit_code: int | None
    signal: Signal | None
    timed_out: bool
    ended_at: datetime


ProcessOutputEvent: TypeAlias = Annotated[
    OutputChunk | OutputGap | ProcessExited, strawberry.union("ProcessOutputEvent")
]


def to_graphql(event: domain.OutputEvent) -> OutputChunk | OutputGap | ProcessExited:
    """One domain output event as its GraphQL type."""
    match event:
        case domain.OutputChunk():
            data, encoding = domain.encode_output(event.data)
            return OutputChunk(seq=event.seq, stream=event.stream, data=data, encoding=encoding)
        case domain.OutputGap():
            return OutputGap(seq=event.seq, lost_events=event.lost_events, lost_bytes=event.lost_bytes)
        case domain.ProcessExit():
            return ProcessExited(
                seq=event.seq,
                exit_code=event.exit_code,
                signal=Signal.of(event.signal),
                timed_out=event.timed_out,
                ended_at=event.ended_at,
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
        async for event in info.context.services.output.follow(capsule_id, selector, from_seq):
            yield to_graphql(event)

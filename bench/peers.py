"""The bare Strawberry peer: a subscription that yields chunks from memory, served as `capsule serve`
serves (uvicorn, graphql-transport-ws), with the types ProcessOutput.graphql selects.

    python -m bench.peers --port P --chunks N --size BYTES

Each processOutput subscription yields a first line (as the suite's writers print before they write),
then N chunks of BYTES bytes of `x`, then ProcessExited: what a subscription costs with no process,
agent, gRPC, store or fan-out behind it.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Annotated

import strawberry
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from strawberry.asgi import GraphQL


@strawberry.enum
class OutputStream(enum.Enum):
    STDOUT = "STDOUT"
    STDERR = "STDERR"


@strawberry.enum
class Encoding(enum.Enum):
    UTF8 = "UTF8"
    BASE64 = "BASE64"


@strawberry.type
class OutputChunk:
    seq: int
    stream: OutputStream
    data: str
    encoding: Encoding


@strawberry.type
class OutputGap:
    seq: int
    lost_events: int
    lost_bytes: float


@strawberry.type
class ProcessRestarted:
    seq: int
    pid: int
    restarts: int
    exit_code: int | None
    signal: str | None
    oom_killed: bool


@strawberry.type
class ProcessExited:
    seq: int
    exit_code: int | None
    signal: str | None
    timed_out: bool
    ended_at: datetime
    oom_killed: bool = False


# The same union as the service's, so that both serve the one ProcessOutput.graphql.
ProcessOutputEvent = Annotated[
    OutputChunk | OutputGap | ProcessRestarted | ProcessExited, strawberry.union("ProcessOutputEvent")
]


@strawberry.type
class Query:
    ok: bool = True


def schema(chunks: int, size: int) -> strawberry.Schema:
    @strawberry.type
    class Subscription:
        @strawberry.subscription
        async def process_output(
            self, capsule_id: strawberry.ID, selector: str, from_seq: int = 0
        ) -> AsyncGenerator[ProcessOutputEvent, None]:
            yield OutputChunk(seq=1, stream=OutputStream.STDOUT, data="live\n", encoding=Encoding.UTF8)
            data = "x" * size
            for seq in range(2, chunks + 2):
                yield OutputChunk(seq=seq, stream=OutputStream.STDOUT, data=data, encoding=Encoding.UTF8)
            yield ProcessExited(
                seq=chunks + 2, exit_code=0, signal=None, timed_out=False, ended_at=datetime.now(UTC)
            )

    return strawberry.Schema(query=Query, subscription=Subscription)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--size", type=int, default=65536)
    options = parser.parse_args()
    graphql = GraphQL(schema(options.chunks, options.size))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/healthz", health),
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")


if __name__ == "__main__":
    main()

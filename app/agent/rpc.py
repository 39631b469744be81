"""gRPC's shapes for calls made without gRPC (the in-process agent, the link to a supervisor): the
AioRpcError a channel raises for a status, and a call's deadline."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from app.agent.link import CallError, within

GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status(code: grpc.StatusCode | int, details: str) -> grpc.aio.AioRpcError:
    """The error a gRPC channel raises for this status (code: grpc's, or its number)."""
    if not isinstance(code, grpc.StatusCode):
        code = GRPC_CODES.get(int(code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def from_call_error(exc: CallError) -> grpc.aio.AioRpcError:
    """The AioRpcError of the status a servicer raised."""
    return status(exc.code, exc.details)


@contextlib.asynccontextmanager
async def call_deadline(seconds: float | None) -> AsyncIterator[None]:
    """Ends the block after seconds (None: never) with the DEADLINE_EXCEEDED status a gRPC call
    raises, and raises a servicer's CallError in the block as its AioRpcError; a TimeoutError of the
    block's own passes unchanged."""
    try:
        async with within(seconds):
            yield
    except CallError as exc:
        raise from_call_error(exc) from None

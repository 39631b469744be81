"""WebSocket handler parts that end a connection once its API key is revoked.

Each operation still open gets an `error` message with UNAUTHENTICATED and nothing after it; then
the connection closes with 4403 and a reason. The view's handlers inherit these.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from graphql import GraphQLError
from graphql.error import GraphQLFormattedError
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage as TransportConnectionInitMessage,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import ConnectionInitMessage, OperationMessage

from app.api.context import Context
from app.errors import ErrorCode

FORBIDDEN = 4403
# A close reason fits in 123 bytes.
REVOKED = "the API key of this connection was revoked: connect again with a valid key"


def _revoked_error() -> GraphQLFormattedError:
    return GraphQLError(REVOKED, extensions={"code": ErrorCode.UNAUTHENTICATED.value}).formatted


def _guard(
    context: Context, end: Callable[[], Coroutine[Any, Any, None]]
) -> Callable[[], Awaitable[None]] | None:
    """Ends the connection once its key is revoked; returns what stops that at the connection's end.
    Until then the connection costs the registry one entry: no task waits for the revocation."""
    key_id = context.key_id
    if key_id is None:
        return None
    ending: list[asyncio.Task[None]] = []

    def revoked() -> None:
        context.team = None  # whatever arrives before the close runs for nobody: UNAUTHENTICATED
        ending.append(asyncio.get_running_loop().create_task(end(), name=f"key-{key_id}-revoked"))

    unsubscribe = context.platform.revocations.subscribe(key_id, revoked)

    async def stop() -> None:
        unsubscribe()
        for task in ending:
            if task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait({task})  # unlike awaiting it, leaves a cancellation of ours alone

    return stop


async def _stop(stop: Callable[[], Awaitable[None]] | None) -> None:
    if stop is not None:
        await stop()


class RevocableTransportWS(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws: a revoked key's operations each get an error, then the socket closes."""

    _guard_stop: Callable[[], Awaitable[None]] | None = None

    async def handle(self) -> None:
        try:
            await super().handle()
        finally:
            await _stop(self._guard_stop)

    async def handle_connection_init(self, message: TransportConnectionInitMessage) -> None:
        await super().handle_connection_init(message)
        if self.connection_acknowledged and self._guard_stop is None:
            self._guard_stop = _guard(self.context, self._end_revoked)

    async def _end_revoked(self) -> None:
        operations = list(self.operations.values())
        for operation in operations:
            await self.cleanup_operation(operation.id)  # cancels its task, which then sends nothing
        tasks = {operation.task for operation in operations if operation.task is not None}
        if tasks:
            await asyncio.wait(tasks)
        with contextlib.suppress(Exception):  # the client may be gone already
            for operation in operations:
                await self.send_message({"id": operation.id, "type": "error", "payload": [_revoked_error()]})
            await self.websocket.close(code=FORBIDDEN, reason=REVOKED)


class RevocableGraphQLWS(BaseGraphQLWSHandler[Context, None]):
    """Legacy graphql-ws: as RevocableTransportWS, with the `complete` a stopped operation would
    send held back, so the error is the operation's last word."""

    _guard_stop: Callable[[], Awaitable[None]] | None = None
    _silenced: frozenset[str] = frozenset()

    async def handle(self) -> None:
        try:
            await super().handle()
        finally:
            await _stop(self._guard_stop)

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        await super().handle_connection_init(message)
        if self.connection_acknowledged and self._guard_stop is None:
            self._guard_stop = _guard(self.context, self._end_revoked)

    async def send_message(self, message: OperationMessage) -> None:
        if message.get("id") in self._silenced and message["type"] != "error":
            return
        await super().send_message(message)

    async def _end_revoked(self) -> None:
        operation_ids = list(self.tasks)
        self._silenced = frozenset(operation_ids)
        for operation_id in operation_ids:
            await self.cleanup_operation(operation_id)
        with contextlib.suppress(Exception):  # the client may be gone already
            for operation_id in operation_ids:
                await self.send_message({"type": "error", "id": operation_id, "payload": _revoked_error()})
            await self.websocket.close(code=FORBIDDEN, reason=REVOKED)

"""The team's limits at the API's edge: operations counted over HTTP and both WebSocket protocols,
a team's WebSocket connections, operations in flight per connection, and the connection_init timeout.

A refused operation gets an error with RATE_LIMITED (and `retryAfterSec` where a retry will succeed
by then); the connection and its other operations go on. A connection past its team's limit closes
with 1013 (try again later) before its connection_ack. The view's handlers inherit these classes.
"""

from __future__ import annotations

import asyncio
import contextlib

from graphql import GraphQLError
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage as TransportConnectionInitMessage,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import SubscribeMessage
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import ConnectionInitMessage, StartMessage

from app import metrics
from app.api.context import Context
from app.errors import RateLimited
from app.services.limits import Slot

TRY_AGAIN_LATER = 1013
INIT_TIMEOUT = 4408
INIT_TIMEOUT_REASON = "Connection initialisation timeout"


async def refuse_connection_init(
    handler: BaseGraphQLTransportWSHandler[Context, None], *, code: int, reason: str
) -> None:
    """Refuses a graphql-transport-ws connection_init, closing with code and reason: first, as
    strawberry's own init does, the init counts as received and its timeout stops."""
    handler.connection_init_received = True
    if handler.connection_init_timeout_task:
        handler.connection_init_timeout_task.cancel()
    await handler.websocket.close(code=code, reason=reason)


def limit_error(error: RateLimited) -> GraphQLError:
    """The GraphQL error of a refusal: its message, RATE_LIMITED and retryAfterSec where known."""
    return GraphQLError(str(error), extensions=error.extensions)


async def count_operations(context: Context, count: int) -> None:
    """Counts an authenticated caller's operations against its team's budget; raises RateLimited."""
    if context.team is not None:
        await context.platform.limits.count_operations(context.team.id, count)


async def _operation_refusal(context: Context, in_flight: int) -> RateLimited | None:
    """Why a connection may not start one more operation now; None when it may (then it is counted)."""
    limit = context.platform.settings.ws_max_subscriptions
    if limit > 0 and in_flight >= limit:
        metrics.RATE_LIMITED.labels("operations_per_connection").inc()
        return RateLimited(
            f"this connection has {limit} operations in flight, its limit: complete one first, "
            "or open another connection"
        )
    try:
        await count_operations(context, 1)
    except RateLimited as error:
        return error
    return None


async def _take_connection(context: Context) -> tuple[Slot | None, str | None]:
    """A connection slot for the caller's team, or why there is none (a close reason)."""
    if context.team is None:
        return None, None
    try:
        return await context.platform.limits.open_connection(context.team.id), None
    except RateLimited as error:
        return None, str(error)[:123]  # a close reason fits in 123 bytes


class LimitedTransportWS(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws: a team's connection slot, and each subscribe counted and bounded."""

    _connection: Slot | None = None

    async def handle(self) -> None:
        try:
            await super().handle()
        finally:
            if self._connection is not None:
                await self._connection.release()

    async def handle_connection_init(self, message: TransportConnectionInitMessage) -> None:
        if self._connection is None and not self.connection_init_received:
            self._connection, refusal = await _take_connection(self.context)
            if refusal is not None:
                await refuse_connection_init(self, code=TRY_AGAIN_LATER, reason=refusal)
                return
        await super().handle_connection_init(message)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        # Before connection_ack or with a reused id the base handler closes the connection.
        if self.connection_acknowledged and message["id"] not in self.operations:
            refusal = await _operation_refusal(self.context, len(self.operations))
            if refusal is not None:
                payload = [limit_error(refusal).formatted]
                await self.send_message({"id": message["id"], "type": "error", "payload": payload})
                return
        await super().handle_subscribe(message)


class LimitedGraphQLWS(BaseGraphQLWSHandler[Context, None]):
    """Legacy graphql-ws: as LimitedTransportWS, plus the connection_init timeout strawberry leaves
    to graphql-transport-ws: 4408 there too."""

    _connection: Slot | None = None
    _init_timeout: asyncio.Task[None] | None = None

    async def handle(self) -> None:
        self._init_timeout = asyncio.create_task(self._close_unless_initialised(), name="ws-init-timeout")
        try:
            await super().handle()
        finally:
            self._init_timeout.cancel()
            await asyncio.wait({self._init_timeout})
            if self._connection is not None:
                await self._connection.release()

    async def _close_unless_initialised(self) -> None:
        await asyncio.sleep(self.context.platform.settings.ws_init_timeout_sec)
        if not self.connection_acknowledged:
            with contextlib.suppress(Exception):  # the client may be gone already
                await self.websocket.close(code=INIT_TIMEOUT, reason=INIT_TIMEOUT_REASON)

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        if self._connection is None and not self.connection_acknowledged:
            self._connection, refusal = await _take_connection(self.context)
            if refusal is not None:
                await self.send_message({"type": "connection_error", "payload": {"message": refusal}})
                await self.websocket.close(code=TRY_AGAIN_LATER, reason=refusal)
                return
        await super().handle_connection_init(message)

    async def handle_start(self, message: StartMessage) -> None:
        operation_id = message["id"]
        if self.connection_acknowledged:
            # The base handler replaces an operation whose id comes again.
            in_flight = len(self.tasks) - (operation_id in self.tasks)
            refusal = await _operation_refusal(self.context, in_flight)
            if refusal is not None:
                payload = limit_error(refusal).formatted
                await self.send_message({"type": "error", "id": operation_id, "payload": payload})
                return
        await super().handle_start(message)

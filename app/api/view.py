"""The Starlette GraphQL view: HTTP and both WebSocket protocols, authenticated per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any, cast

from cross_web import HTTPException
from graphql import GraphQLError, OperationType, get_operation_ast, parse
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.schema import BaseSchema
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage as TransportConnectionInitMessage,
)
from strawberry.subscriptions.protocols.graphql_ws.types import ConnectionInitMessage
from strawberry.types import ExecutionResult
from strawberry.types.unset import UnsetType

from app.api import observe
from app.api.auth import authenticate, bearer_key, websocket_refusal
from app.api.context import Context
from app.api.graphiql import graphiql_page
from app.api.limits import (
    LimitedGraphQLWS,
    LimitedTransportWS,
    count_operations,
    limit_error,
    refuse_connection_init,
)
from app.api.multiplex import MultiplexedGraphQLWS, MultiplexedTransportWS
from app.api.negotiation import GRAPHQL_RESPONSE_JSON, request_error_status, wants_graphql_response
from app.api.revocation import FORBIDDEN, RevocableGraphQLWS, RevocableTransportWS
from app.api.schema import schema
from app.api.sharing import encode_message
from app.api.ws_adapter import LeanWebSocketAdapter
from app.api.ws_messages import StrictGraphQLWS, StrictTransportWS
from app.errors import ErrorCode, RateLimited
from app.services.team import Platform

logger = logging.getLogger(__name__)

GOING_AWAY = 1001
GOING_AWAY_REASON = (
    "the server is shutting down: reconnect, and resume with fromSeq the last seq seen plus one"
)
ORIGIN_REFUSED = "this page's origin may not open a WebSocket here: see CAPSULE_WS_ALLOWED_ORIGINS"
NOT_AN_OBJECT = (
    'expected a JSON object, got {kind}: a GraphQL request is {{"query": "...", "variables": {{...}}}}'
)
_JSON_KINDS: dict[type, str] = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
SUBSCRIPTION_OVER_HTTP = (
    "subscriptions run over a WebSocket at this same address: use graphql-transport-ws or graphql-ws"
)


def _is_subscription(query: str | None, operation_name: str | None) -> bool:
    """True when the operation a request names is a subscription (bad documents say False)."""
    if "subscription" not in (query or ""):  # most requests: no parse beyond strawberry's own
        return False
    try:
        document = parse(query or "")
    except GraphQLError:
        return False
    operation = get_operation_ast(document, operation_name)
    return operation is not None and operation.operation is OperationType.SUBSCRIPTION


class _EveryOperation:
    """The schema as the graphql-ws handler calls it: its `subscribe` runs queries and mutations too.

    subscriptions-transport-ws clients (gql among them) send every operation with `start`; strawberry's
    handler would refuse a query there as "queries are not allowed", a bug's error to our mask.
    """

    def __init__(self, schema: BaseSchema) -> None:
        self._schema = schema

    def __getattr__(self, name: str) -> Any:
        return getattr(self._schema, name)

    async def subscribe(self, **kwargs: Any) -> Any:
        return await self._schema.stream(**kwargs)


class GraphQLWSHandler(StrictGraphQLWS, LimitedGraphQLWS, RevocableGraphQLWS, MultiplexedGraphQLWS):
    """Legacy graphql-ws: a refused key closes with 4403 and says why, as graphql-transport-ws does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema = cast("BaseSchema", _EveryOperation(self.schema))

    async def handle(self) -> None:
        with observe.connection("graphql-ws", cast("GraphQLView", self.view), self):
            await super().handle()

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        payload = message.get("payload")
        self.context.connection_params = payload if isinstance(payload, dict) else None
        refusal = await websocket_refusal(self.context)
        if refusal is not None:
            await self.send_message({"type": "connection_error", "payload": {"message": refusal}})
            await self.websocket.close(code=FORBIDDEN, reason=refusal)
            return
        await super().handle_connection_init(message)


class GraphQLTransportWSHandler(
    StrictTransportWS, LimitedTransportWS, RevocableTransportWS, MultiplexedTransportWS
):
    """graphql-transport-ws: a refused key closes with 4403 and a reason that says which and where.

    Strawberry's own handler closes a rejected connection with the bare reason "Forbidden".
    """

    async def handle(self) -> None:
        with observe.connection("graphql-transport-ws", cast("GraphQLView", self.view), self):
            await super().handle()

    async def handle_connection_init(self, message: TransportConnectionInitMessage) -> None:
        payload = message.get("payload", {})
        if isinstance(payload, dict) and not self.connection_init_received:
            self.context.connection_params = payload
            refusal = await websocket_refusal(self.context)
            if refusal is not None:
                await refuse_connection_init(self, code=FORBIDDEN, reason=refusal)
                return
        await super().handle_connection_init(message)


class GraphQLView(GraphQL[Context, None]):
    """Builds a Context per request; WebSocket callers authenticate in connection_init."""

    graphql_ws_handler_class = GraphQLWSHandler
    graphql_transport_ws_handler_class = GraphQLTransportWSHandler
    websocket_adapter_class = LeanWebSocketAdapter

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(schema, keep_alive=True, keep_alive_interval=15, **kwargs)
        self._platform: Platform | None = None
        # The handlers of the WebSockets open now, so that a shutdown can close each with 1001.
        self.sockets: set[Any] = set()
        self._emptied: asyncio.Event | None = None

    async def going_away(self, timeout_sec: float = 2.0) -> None:
        """Closes every WebSocket with 1001 (going away), so that clients reconnect elsewhere or to
        the restarted server and resume; returns once all have closed, or after timeout_sec."""
        handlers = list(self.sockets)
        if not handlers:
            return
        logger.info("closing %d WebSocket(s) with 1001 for the shutdown", len(handlers))
        for handler in handlers:
            with contextlib.suppress(Exception):  # a client that is gone already
                await handler.websocket.close(code=GOING_AWAY, reason=GOING_AWAY_REASON)
        self._emptied = asyncio.Event()
        if self.sockets:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_sec):
                    await self._emptied.wait()

    def socket_closed(self) -> None:
        """A WebSocket's handler has ended (see observe.connection)."""
        if not self.sockets and self._emptied is not None:
            self._emptied.set()

    @property
    def platform(self) -> Platform:
        """The server's shared parts; set by the app's lifespan before the first request."""
        if self._platform is None:
            raise RuntimeError("the GraphQL view is used before the server has started")
        return self._platform

    @platform.setter
    def platform(self, platform: Platform | None) -> None:
        self._platform = platform

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        context = Context(request=request, response=response, platform=self.platform)
        if isinstance(request, Request):
            await authenticate(context, bearer_key(request.headers.get("authorization")))
        return context

    async def execute_operation(
        self,
        request: Request,
        request_adapter: Any,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: Context,
        root_value: None,
        sub_response: Response,
    ) -> Any:
        # Counted before any GraphQL parsing, so that a team over its budget costs little to refuse.
        count = len(request_data) if isinstance(request_data, list) else 1
        try:
            await count_operations(context, count)
        except RateLimited as refusal:
            sub_response.headers["Retry-After"] = str(math.ceil(refusal.retry_after_sec or 1))
            if sub_response.media_type == GRAPHQL_RESPONSE_JSON:
                sub_response.status_code = 429
            result = ExecutionResult(data=None, errors=[limit_error(refusal)])
            return [result] * count if isinstance(request_data, list) else result
        return await super().execute_operation(
            request, request_adapter, request_data, context, root_value, sub_response
        )

    async def execute_single(
        self,
        request: Request,
        request_adapter: Any,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        # Plain HTTP would run a subscription's resolver as if it were a query and answer null;
        # subscriptions belong on a WebSocket (multipart HTTP clients never reach this method).
        if _is_subscription(request_data.query, request_data.operation_name):
            error = GraphQLError(SUBSCRIPTION_OVER_HTTP, extensions={"code": ErrorCode.INVALID_REQUEST.value})
            result = ExecutionResult(data=None, errors=[error])
        else:
            result = await super().execute_single(
                request, request_adapter, sub_response, context, root_value, request_data
            )
        if sub_response.media_type == GRAPHQL_RESPONSE_JSON:
            sub_response.status_code = request_error_status(result) or sub_response.status_code
        return result

    async def get_sub_response(self, request: Request | WebSocket) -> Response:
        # The media type the answer will have: application/graphql-response+json where Accept asks for it.
        sub_response = await super().get_sub_response(request)
        if isinstance(request, Request) and wants_graphql_response(request.headers.get("accept")):
            sub_response.media_type = GRAPHQL_RESPONSE_JSON
        return sub_response

    def create_response(
        self, response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse], sub_response: Response
    ) -> Response:
        graphql_response = sub_response.media_type == GRAPHQL_RESPONSE_JSON
        if graphql_response and (sub_response.status_code or 200) >= 400 and isinstance(response_data, dict):
            # A request error's answer has no data entry at all, not even null.
            response_data = response_data.copy()
            response_data.pop("data", None)
        response = super().create_response(response_data, sub_response)
        if graphql_response:
            response.headers["content-type"] = f"{GRAPHQL_RESPONSE_JSON}; charset=utf-8"
        response.headers.add_vary_header("Accept")
        return response

    def encode_json(self, data: object) -> str:
        # orjson; and a subscription event's payload encoded once for all the sockets that get it.
        return encode_message(data)

    def parse_json(self, data: str | bytes) -> Any:
        # Strawberry reads a request from any JSON value and fails with a 500 on a string, number or null.
        value = super().parse_json(data)
        if not isinstance(value, dict | list):
            kind = _JSON_KINDS.get(type(value), "null")
            raise HTTPException(400, NOT_AN_OBJECT.format(kind=kind))
        return value

    async def reject_websocket(self, request: WebSocket) -> WebSocket:
        # Strawberry answers a refused origin's handshake with HTTP 403, which a browser shows its page
        # as close code 1006 with no reason; accepted, then closed with 4403, the page sees why.
        await request.accept(subprotocol=await self.pick_websocket_subprotocol(request))
        await request.close(code=FORBIDDEN, reason=ORIGIN_REFUSED)
        return request

    async def render_graphql_ide(self, request: Request) -> Response:
        return graphiql_page(request)  # strawberry's own page loads GraphiQL from a CDN

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        # Both handlers have refused a bad key by now, with its reason; this guards any other path.
        if (refusal := await websocket_refusal(context)) is not None:
            raise ConnectionRejectionError({"message": refusal})
        return None  # a plain connection_ack

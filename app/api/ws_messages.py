"""WebSocket handler parts that check each message's shape before strawberry's handlers read it.

Strawberry indexes a message as the protocol says it must be: a JSON array, a `type` that is not a
string, an `id` that is a list or a `payload` that is not an object raised in its handler, and the
connection ended with 1011 and a traceback in the log. An unknown type's close reason quoted the
type whole, so a long one made the close itself fail (a reason fits in 123 bytes). Here each
protocol answers such a message as its reference server does: graphql-transport-ws closes with 4400
and says what was wrong; subscriptions-transport-ws (graphql-ws) answers with an `error` message and
keeps the connection.
"""

from __future__ import annotations

from typing import Any, cast

from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_transport_ws.types import Message
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import OperationMessage

from app.api.context import Context

BAD_MESSAGE = 4400
TRANSPORT_TYPES = frozenset({"connection_init", "ping", "pong", "subscribe", "complete"})
LEGACY_TYPES = frozenset({"connection_init", "connection_terminate", "start", "stop"})


def _quoted(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _optional(payload: dict[str, Any], key: str, kind: type, kind_name: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, kind):
        return f"payload.{key} must be {kind_name} or null"
    return None


def _operation_problem(payload: object) -> str | None:
    """What is wrong with a subscribe's (or start's) payload, or None."""
    if not isinstance(payload, dict):
        return "payload must be an object with a query"
    if not isinstance(payload.get("query"), str):
        return "payload.query must be a string"
    return (
        _optional(payload, "variables", dict, "an object")
        or _optional(payload, "operationName", str, "a string")
        or _optional(payload, "extensions", dict, "an object")
    )


def _id_problem(message: dict[str, Any], kind: str) -> str | None:
    operation_id = message.get("id")
    if not isinstance(operation_id, str) or not operation_id:
        return f"a {kind} message needs an id that is a non-empty string"
    return None


def _shape_problem(message: object, known: frozenset[str], with_id: frozenset[str]) -> str | None:
    if not isinstance(message, dict):
        return "a message must be a JSON object"
    kind = message.get("type")
    if not isinstance(kind, str):
        return "a message needs a type that is a string"
    if kind not in known:
        return f"unknown message type {_quoted(kind)}"
    if kind in with_id:
        return _id_problem(message, kind)
    return None


def transport_problem(message: object) -> str | None:
    """What is wrong with a graphql-transport-ws message from a client, or None; at most 123 bytes."""
    problem = _shape_problem(message, TRANSPORT_TYPES, frozenset({"subscribe", "complete"}))
    if problem is not None:
        return problem
    message = cast("dict[str, Any]", message)
    if message["type"] == "subscribe":
        return _operation_problem(message.get("payload"))
    if message.get("payload") is not None and not isinstance(message["payload"], dict):
        return f"a {message['type']} payload must be an object or null"
    return None


def legacy_problem(message: object) -> str | None:
    """What is wrong with a graphql-ws (subscriptions-transport-ws) message, or None."""
    problem = _shape_problem(message, LEGACY_TYPES, frozenset({"start", "stop"}))
    if problem is None and cast("dict[str, Any]", message)["type"] == "start":
        return _operation_problem(cast("dict[str, Any]", message).get("payload"))
    return problem


class StrictTransportWS(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws: a malformed message closes the connection with 4400 and says why."""

    async def handle_message(self, message: Message) -> None:
        problem = transport_problem(message)
        if problem is not None:
            await self.websocket.close(code=BAD_MESSAGE, reason=problem)
            return
        if message.get("payload", ...) is None:  # the protocol allows a null payload: none at all
            message = cast("Message", {k: v for k, v in message.items() if k != "payload"})
        await super().handle_message(message)


class StrictGraphQLWS(BaseGraphQLWSHandler[Context, None]):
    """graphql-ws: a malformed message gets an error message, with its id where it has a usable one."""

    async def handle_message(self, message: OperationMessage) -> None:
        problem = legacy_problem(message)
        if problem is None and message["type"] == "connection_init" and self.connection_acknowledged:
            # Strawberry's handler would ack again and start a second keep-alive, never stopped.
            problem = "connection_init was sent already: this connection is initialised"
        if problem is None:
            await super().handle_message(message)
            return
        error: dict[str, Any] = {"type": "error", "payload": {"message": problem}}
        operation_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(operation_id, str) and operation_id:
            error["id"] = operation_id
        await self.send_message(cast("OperationMessage", error))

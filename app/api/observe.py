"""What the API counts of itself: GraphQL operations (by type, root field and error code, with a
latency histogram for queries and mutations), open WebSocket connections and running subscriptions.

Labels are bounded: an operation is named by its first root field when the schema has that field
(else "unknown", or "introspection" for __schema and __type), never by the client's operation name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from graphql import FieldNode, GraphQLError, OperationType, get_operation_ast
from strawberry.extensions import SchemaExtension

from app import metrics
from app.errors import ErrorCode

_CODES = frozenset(code.value for code in ErrorCode)
_TYPES = {
    OperationType.QUERY: "query",
    OperationType.MUTATION: "mutation",
    OperationType.SUBSCRIPTION: "subscription",
}


def error_code(errors: list[GraphQLError] | None) -> str:
    """The code of an operation's first error: none, one of ours, or OTHER."""
    if not errors:
        return "none"
    code = (errors[0].extensions or {}).get("code")
    return code if isinstance(code, str) and code in _CODES else "OTHER"


class OperationMetrics(SchemaExtension):
    """Counts each operation when it ends (a subscription when its stream ends), with its error code."""

    _type = "unknown"
    _field = "unknown"
    _subscribed = False

    def on_validate(self) -> Iterator[None]:
        yield
        context = self.execution_context
        if getattr(context.context, "multiplexed", False):
            return  # a multiplexed group's own run: its members count themselves (api/multiplex.py)
        document = context.graphql_document
        if document is None:
            return
        operation = get_operation_ast(document, context.operation_name)
        if operation is None:
            return
        self._type = _TYPES.get(operation.operation, "unknown")
        first = operation.selection_set.selections[0] if operation.selection_set.selections else None
        if isinstance(first, FieldNode):
            name = first.name.value
            root = context.schema._schema.get_root_type(operation.operation)
            if name.startswith("__"):
                self._field = "introspection"
            elif root is not None and name in root.fields:
                self._field = name
        if operation.operation is OperationType.SUBSCRIPTION and not context.pre_execution_errors:
            self._subscribed = True
            metrics.WS_SUBSCRIPTIONS.labels(self._field).inc()

    def on_operation(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._subscribed:
                metrics.WS_SUBSCRIPTIONS.labels(self._field).dec()
            context = self.execution_context
            if not getattr(context.context, "multiplexed", False):  # the group's members count
                result = context.result
                errors = context.pre_execution_errors or (result.errors if result is not None else None)
                metrics.GRAPHQL_OPERATIONS.labels(self._type, self._field, error_code(errors)).inc()
                if self._type in ("query", "mutation"):
                    elapsed = time.perf_counter() - start
                    metrics.GRAPHQL_SECONDS.labels(self._type, self._field).observe(elapsed)


class Sockets(Protocol):
    """Where the view keeps the handlers of its open WebSockets."""

    sockets: set[Any]

    def socket_closed(self) -> None: ...


@contextmanager
def connection(protocol: str, view: Sockets, handler: Any) -> Iterator[None]:
    """Counts an open WebSocket and keeps its handler in view.sockets while the block runs."""
    gauge = metrics.WS_CONNECTIONS.labels(protocol)
    gauge.inc()
    view.sockets.add(handler)
    try:
        yield
    finally:
        view.sockets.discard(handler)
        gauge.dec()
        view.socket_closed()

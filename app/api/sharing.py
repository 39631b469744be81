"""One execution and one JSON encoding per subscription event, shared by its subscribers.

Subscribers of one process on this replica read the same event objects from the fan-out (one
upstream stream each), and api/output.py turns each into one GraphQL object. For those objects,
SharingExecutor keeps the result of executing an event for a (document, variables, team): the next
subscriber with the same operation, variables and team gets that very result, not another run of
graphql-core. The transports' messages then carry the same `data` object, and `encode_message`
encodes its payload once: each socket's message is that text with its own subscription id around it.
Teams never share: the team is part of the key, as are the operation's node and its variables.

Memory: the shared results are kept for the most recent events only (SHARED_EVENTS, SHARED_BYTES),
enough for subscribers reading the same event at about the same time; one that lags executes its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import orjson
from graphql import ExecutionResult, OperationType
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

# How many recent (event, operation, variables, team) results are kept, and about how many bytes of
# output they may hold between them (the newest one is kept whatever its size).
SHARED_EVENTS = 64
SHARED_BYTES = 8 * 1024 * 1024


# The GraphQL types whose events may be shared, each with about how many bytes a result of one holds.
# An event of one of them executes the same for every subscriber: it depends on nothing but itself,
# the document, the variables and the team.
SHAREABLE: dict[type, Callable[[Any], int]] = {}


def shareable(kind: type, size: Callable[[Any], int] = lambda _event: 64) -> None:
    """Lets the events of a GraphQL type share their results."""
    SHAREABLE[kind] = size


def frozen(value: Any) -> Hashable:
    """A hashable form of a JSON-like value (variables), equal for equal values."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(frozen(v) for v in value)
    if isinstance(value, Hashable):
        return (type(value).__name__, value)
    return ("repr", repr(value))


class _Shared:
    __slots__ = ("encoded", "event", "operation", "result", "size")

    def __init__(self, event: object, operation: object, result: ExecutionResult, size: int) -> None:
        self.event, self.operation, self.result, self.size = event, operation, result, size
        self.encoded: str | None = None  # the payload {"data": ...} as JSON, once a socket sent it


class SharedResults:
    """Recent shared results, by key, and by the identity of their data for the encoder."""

    def __init__(self, *, max_events: int = SHARED_EVENTS, max_bytes: int = SHARED_BYTES) -> None:
        self._max_events, self._max_bytes = max_events, max_bytes
        self._by_key: OrderedDict[Hashable, _Shared] = OrderedDict()
        self._by_data: dict[int, _Shared] = {}
        self._bytes = 0
        self.executed = 0  # results computed (for tests: shared ones are not counted twice)

    def get(self, key: Hashable, event: object, operation: object) -> ExecutionResult | None:
        """The result kept for key, if it is the one of this very event and operation node."""
        shared = self._by_key.get(key)
        if shared is None or shared.event is not event or shared.operation is not operation:
            return None
        return shared.result

    def put(
        self, key: Hashable, event: object, operation: object, result: ExecutionResult, size: int
    ) -> None:
        if result.errors or not isinstance(result.data, dict):
            return  # errors are handled (logged, masked) per subscriber, as ever
        old = self._by_key.pop(key, None)
        if old is not None:
            self._forget(old)
        shared = _Shared(event, operation, result, size)
        self._by_key[key] = shared
        self._by_data[id(result.data)] = shared
        self._bytes += shared.size
        while len(self._by_key) > 1 and (
            len(self._by_key) > self._max_events or self._bytes > self._max_bytes
        ):
            self._forget(self._by_key.popitem(last=False)[1])

    def _forget(self, shared: _Shared) -> None:
        self._bytes -= shared.size
        if self._by_data.get(id(shared.result.data)) is shared:
            del self._by_data[id(shared.result.data)]

    def encoded_payload(self, data: object) -> str | None:
        """The JSON of {"data": data} when data is a shared result's, encoded on first use."""
        shared = self._by_data.get(id(data))
        if shared is None or shared.result.data is not data:
            return None
        if shared.encoded is None:
            shared.encoded = orjson.dumps({"data": data}).decode()
        return shared.encoded

    def __len__(self) -> int:
        return len(self._by_key)


SHARED = SharedResults()


def _team_of(context: object) -> Hashable:
    team = getattr(context, "team", None)
    return getattr(team, "id", None)


class _KnownResult:
    """A per-event executor whose result is already known: a shared one."""

    __slots__ = ("result",)

    def __init__(self, result: ExecutionResult) -> None:
        self.result = result

    def execute_operation(self, serially: bool | None = None) -> ExecutionResult:
        return self.result


class SharingExecutor(StrawberryGraphQLCoreExecutionContext):
    """strawberry's executor, with each shareable subscription event executed once per operation,
    variables and team; any other operation runs as it always has."""

    _operation_key: Hashable = None  # (the operation node's id, the variables), made once

    def _share_key(self, event: object) -> Hashable:
        if self._operation_key is None:
            self._operation_key = (id(self.operation), frozen(self.variable_values.coerced))
        # The team is read each time: a connection whose key is revoked runs for nobody.
        return (id(event), self._operation_key, _team_of(self.context_value))

    def build_per_event_executor(self, payload: Any) -> Any:
        # A result already shared needs no executor of its own (graphql-core copies one per event).
        if type(payload) in SHAREABLE and self.operation.operation is OperationType.SUBSCRIPTION:
            shared = SHARED.get(self._share_key(payload), payload, self.operation)
            if shared is not None:
                return _KnownResult(shared)
        return super().build_per_event_executor(payload)

    def execute_operation(self, serially: bool | None = None) -> Any:
        event, operation = self.root_value, self.operation
        size = SHAREABLE.get(type(event))
        if size is None or operation.operation is not OperationType.SUBSCRIPTION:
            return super().execute_operation(serially)
        key = self._share_key(event)
        shared = SHARED.get(key, event, operation)  # ids checked against the very objects kept
        if shared is not None:
            return shared
        result = super().execute_operation(serially)
        if isinstance(result, ExecutionResult):
            SHARED.executed += 1
            SHARED.put(key, event, operation, result, size(event))
        return result


def _id_json(value: object) -> str:
    return str(orjson.dumps(value), "utf-8")


def encode_message(message: object) -> str:
    """A WebSocket message as JSON text; a shared event's payload is encoded once for every socket."""
    if type(message) is dict and len(message) == 3 and "id" in message:
        kind, payload = message.get("type"), message.get("payload")
        if kind in ("next", "data") and type(payload) is dict and len(payload) == 1 and "data" in payload:
            encoded = SHARED.encoded_payload(payload["data"])
            if encoded is not None:
                return f'{{"id":{_id_json(message["id"])},"type":"{kind}","payload":{encoded}}}'
    return str(orjson.dumps(message), "utf-8")

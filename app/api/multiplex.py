"""processOutput subscribers that run the same operation share one pump, as Hasura multiplexes.

Subscribers on this replica with the same document text, operation name, variables and team join
one group. The group runs the operation once, the way strawberry runs any subscription (parsing,
validation, extensions, the resolver reading the fan-out, each event executed and its errors
masked), with a context of its own for the team. Each result is encoded once, into a log of messages
the group's members read, each from its own cursor on its own operation's task: the framed text a
socket gets differs from the others' only by the subscription id around the same payload, and one
text serves every socket whose subscription has the same id. A socket that is slow holds back only
its own task; the pump and the other sockets go on.

A member that falls behind the log (about fanout_buffer_bytes of messages) leaves the group and goes
on alone from the seq after the last event it sent, on strawberry's own path with fromSeq set to it:
the fan-out's shared stream while that still holds its events, else the agent's log, with an
OutputGap where that no longer holds them, as a slow subscriber always has. A newcomer joins a group
whose log still holds every message the group made (it gets them all, then follows); otherwise it
starts a group of its own. Anything the group cannot serve (a document that fails before execution,
a pump that broke) sends its members on alone too, from where each got to, so that they see exactly
what strawberry's path would have shown them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

import orjson
from graphql import FieldNode, GraphQLError, OperationType, VariableNode, get_operation_ast, parse
from starlette.websockets import WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.async_base_view import AsyncWebSocketAdapter
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.schema import BaseSchema
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import CompleteMessage
from strawberry.types.execution import ExecutionResult, PreExecutionError

from app import domain, metrics
from app.api.context import Context
from app.api.observe import error_code
from app.api.sharing import frozen

logger = logging.getLogger(__name__)

FIELD: Final = "processOutput"
# Documents longer than this run on strawberry's path alone (their shapes are not cached).
MAX_DOCUMENT_CHARS = 16 * 1024
_SHAPES_KEPT = 256


@dataclass(frozen=True, slots=True)
class Shape:
    """What a multiplexed document needs: the variable its processOutput's fromSeq reads."""

    from_seq_variable: str


_shapes: OrderedDict[tuple[str, str | None], Shape | None] = OrderedDict()


def _read_shape(query: str, operation_name: str | None) -> Shape | None:
    try:
        document = parse(query)
    except GraphQLError:
        return None
    operation = get_operation_ast(document, operation_name)
    if operation is None or operation.operation is not OperationType.SUBSCRIPTION:
        return None
    selections = operation.selection_set.selections
    if len(selections) != 1 or not isinstance(selections[0], FieldNode):
        return None
    field = selections[0]
    if field.name.value != FIELD or field.directives:
        return None
    argument = next((a for a in field.arguments or () if a.name.value == "fromSeq"), None)
    if argument is None or not isinstance(argument.value, VariableNode):
        return None
    return Shape(argument.value.name.value)


def shape_of(query: object, operation_name: object) -> Shape | None:
    """How a document is multiplexed, or None when it runs on strawberry's path alone: anything but
    a subscription of processOutput alone whose fromSeq is a variable."""
    if not isinstance(query, str) or FIELD not in query or len(query) > MAX_DOCUMENT_CHARS:
        return None
    if operation_name is not None and not isinstance(operation_name, str):
        return None
    key = (query, operation_name)
    if key in _shapes:
        _shapes.move_to_end(key)
        return _shapes[key]
    shape = _shapes[key] = _read_shape(query, operation_name)
    while len(_shapes) > _SHAPES_KEPT:
        _shapes.popitem(last=False)
    return shape


class GroupContext(Context):
    """The context a group's operation runs with: its team's, no socket's own."""

    multiplexed: ClassVar[bool] = True
    last_output: domain.OutputEvent | None = None

    def track_output(self, event: domain.OutputEvent) -> None:
        """The resolver's note of the event it hands to execution (the pump reads its seq)."""
        self.last_output = event


class _Item:
    """One message of a group's log: its payload's JSON, and the seq a member goes on from after it."""

    __slots__ = ("_framed", "_prefix", "next_seq", "payload")

    def __init__(self, payload: str, next_seq: int | None) -> None:
        self.payload, self.next_seq = payload, next_seq
        self._prefix: str | None = None
        self._framed = ""

    def framed(self, prefix: str) -> str:
        """The message for a subscription whose text begins with prefix; the same text for the same prefix."""
        if prefix != self._prefix:
            self._prefix, self._framed = prefix, f"{prefix}{self.payload}}}"
        return self._framed


def _payload(result: ExecutionResult) -> str:
    payload: dict[str, object] = {"data": result.data}
    if result.errors:
        payload["errors"] = [error.formatted for error in result.errors]
    if result.extensions:
        payload["extensions"] = result.extensions
    return orjson.dumps(payload).decode()


class Group:
    """One operation run once for its members; its results as a log of encoded messages."""

    def __init__(self, key: Hashable, *, cap: int) -> None:
        self.key, self.cap = key, cap
        self.items: dict[int, _Item] = {}  # by absolute index
        self.first_index = self.end_index = 0
        self.size = 0
        self.members = 0
        self.done = False  # the operation ended: each member completes once it has sent the log
        self.abandoned = False  # the group cannot serve: each member goes on alone
        self.final_errors: list[GraphQLError] | None = None
        self.changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.executions = 0  # results made (for tests: one per event, whatever the members)

    @property
    def joinable(self) -> bool:
        return not (self.done or self.abandoned) and self.first_index == 0

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def append(self, result: ExecutionResult, event: domain.OutputEvent | None) -> None:
        next_seq = None
        if event is not None:  # after a gap, the next event may carry the gap's own seq
            next_seq = event.seq if isinstance(event, domain.OutputGap) else event.seq + 1
        item = _Item(_payload(result), next_seq)
        self.items[self.end_index] = item
        self.end_index += 1
        self.size += len(item.payload)
        self.executions += 1
        self.final_errors = result.errors
        while self.size > self.cap and self.end_index - self.first_index > 1:
            self.size -= len(self.items.pop(self.first_index).payload)
            self.first_index += 1
        if self.first_index:
            _forget(self)  # newcomers would miss what it dropped: they start a group of their own
        self.notify()

    async def pump(
        self, schema: BaseSchema, context: GroupContext, query: str, variables: dict[str, Any] | None,
        operation_name: str | None,
    ) -> None:  # fmt: skip
        metrics.OUTPUT_AUDIENCE.set(lambda: self.members)  # the fan-out counts events once per member
        first = True
        try:
            source = await schema.stream(
                query, variable_values=variables, context_value=context, operation_name=operation_name
            )
            async with aclosing(source):
                async for result in source:
                    if not isinstance(result, ExecutionResult) or (
                        first and isinstance(result, PreExecutionError)
                    ):
                        self.abandoned = True  # strawberry's path answers each member as it would
                        return
                    first = False
                    event, context.last_output = context.last_output, None
                    self.append(result, event)
            self.done = True
        except Exception:
            logger.exception("the pump of a multiplexed processOutput failed; its subscribers go on alone")
            self.abandoned = True
        finally:
            _forget(self)
            self.notify()

    def leave(self) -> None:
        self.members -= 1
        if self.members == 0:
            _forget(self)
            if self.task is not None and not self.task.done():
                self.task.cancel()


GROUPS: dict[Hashable, Group] = {}


def _forget(group: Group) -> None:
    if GROUPS.get(group.key) is group:
        del GROUPS[group.key]


# What a member's follow ends with: DONE (every message sent: the operation completes), or the
# variables to go on with alone on strawberry's path (fromSeq where the member got to).
DONE: Final = object()
Send = Callable[[str], Awaitable[None]]


def _prefix(operation_id: str, kind: str) -> str:
    return f'{{"id":{orjson.dumps(operation_id).decode()},"type":"{kind}","payload":'


async def follow(
    *,
    schema: BaseSchema,
    context: Context,
    query: str,
    operation_name: str | None,
    variables: dict[str, Any] | None,
    operation_id: str,
    kind: str,
    send: Send,
    cap: int,
) -> object:
    """Serves one subscription from its group's log until the end; DONE, or the variables to go on
    with alone (the original ones where nothing was sent yet). Returns variables at once, unchanged,
    for an operation that is not multiplexed."""
    shape = shape_of(query, operation_name)
    team = context.team
    if shape is None or team is None or (variables is not None and not isinstance(variables, dict)):
        return variables
    key = (query, operation_name, frozen(variables or {}), team.id)
    group = GROUPS.get(key)
    if group is None or not group.joinable:
        group = GROUPS[key] = Group(key, cap=cap)
        own = GroupContext(
            request=context.request,
            response=None,
            platform=context.platform,
            team=team,
            connection_params=context.connection_params,
        )
        group.task = asyncio.create_task(
            group.pump(schema, own, query, variables, operation_name), name=f"multiplex-{team.id}"
        )
    group.members += 1
    gauge = metrics.WS_SUBSCRIPTIONS.labels(FIELD)
    gauge.inc()
    code: str | None = "none"  # how the operation ended here (None: it goes on alone, which counts it)
    try:
        next_seq = await _serve(group, _prefix(operation_id, kind), send)
        if next_seq is DONE:
            code = error_code(group.final_errors)
            return DONE
        code = None
        if next_seq is None:
            return variables
        return {**(variables or {}), shape.from_seq_variable: next_seq}
    finally:
        gauge.dec()
        group.leave()
        if code is not None:
            metrics.GRAPHQL_OPERATIONS.labels("subscription", FIELD, code).inc()


async def _serve(group: Group, prefix: str, send: Send) -> object:
    """Sends the group's messages from the start of its log; DONE at its end, else the seq to go on
    alone from (None: from the start)."""
    cursor = group.first_index
    next_seq: int | None = None
    if cursor:  # joined a group that has dropped messages already: never, see Group.joinable
        return None
    while True:
        if cursor < group.first_index:
            return next_seq  # fell behind the log: on alone, from the seq after the last event sent
        if cursor < group.end_index:
            item = group.items[cursor]
            cursor += 1
            if item.next_seq is not None:
                next_seq = item.next_seq
            await send(item.framed(prefix))
            continue
        if group.done:
            return DONE
        if group.abandoned:
            return next_seq
        await asyncio.shield(group.changed)  # one member's cancellation leaves it be


class MultiplexedTransportWS(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws: a processOutput subscription served from its group's log."""

    async def run_operation(self, operation: Operation[Context, None]) -> None:
        try:
            outcome = await follow(
                schema=self.schema,
                context=self.context,
                query=operation.query,
                operation_name=operation.operation_name,
                variables=operation.variables,
                operation_id=operation.id,
                kind="next",
                send=self._send_text,
                cap=self.context.platform.settings.fanout_buffer_bytes,
            )
        except Exception as error:  # as strawberry's run_operation: logged, completed, forgotten
            await self.handle_task_exception(error)
            with contextlib.suppress(Exception):
                await operation.send_operation_message({"id": operation.id, "type": "complete"})
            self.operations.pop(operation.id, None)
            raise
        if outcome is DONE:
            await operation.send_operation_message({"id": operation.id, "type": "complete"})
            return
        operation.variables = cast("dict[str, object] | None", outcome)
        await super().run_operation(operation)

    async def _send_text(self, text: str) -> None:
        await _send_text(self.context, self.websocket, text)


class MultiplexedGraphQLWS(BaseGraphQLWSHandler[Context, None]):
    """Legacy graphql-ws: as MultiplexedTransportWS, its `data` messages."""

    async def handle_async_results(
        self, operation_id: str, query: str, operation_name: str | None, variables: dict[str, object] | None
    ) -> None:
        try:
            outcome = await follow(
                schema=self.schema,
                context=self.context,
                query=query,
                operation_name=operation_name,
                variables=variables,
                operation_id=operation_id,
                kind="data",
                send=self._send_text,
                cap=self.context.platform.settings.fanout_buffer_bytes,
            )
            if outcome is not DONE:
                outcome = cast("dict[str, object] | None", outcome)
                await super().handle_async_results(operation_id, query, operation_name, outcome)
                return
            await self.send_message(CompleteMessage(type="complete", id=operation_id))
        except asyncio.CancelledError:  # stopped: as strawberry's handler, a complete
            await self.send_message(CompleteMessage(type="complete", id=operation_id))
        finally:
            self.subscriptions.pop(operation_id, None)
            self.tasks.pop(operation_id, None)

    async def _send_text(self, text: str) -> None:
        await _send_text(self.context, self.websocket, text)


async def _send_text(context: Context, adapter: AsyncWebSocketAdapter, text: str) -> None:
    if context.team is None:
        return  # its key was revoked: the connection is closing, and nothing more goes out
    try:
        await cast("ASGIWebSocketAdapter", adapter).ws.send_text(text)
    except WebSocketDisconnect as exc:
        raise WebSocketDisconnected from exc

"""SharingExecutor: one execution per event, document, variables and team; teams never share."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import strawberry
from strawberry.extensions import ParserCache

from app.api.sharing import SharingExecutor, encode_message, shareable
from app.domain import Team

calls: list[str] = []


@strawberry.type
class Event:
    text: str

    @strawberry.field
    def shown(self, prefix: str = "") -> str:
        calls.append(self.text)
        return prefix + self.text


shareable(Event)
# Every subscriber is handed these very objects, new ones for each test.
EVENTS: list[Event] = []


@strawberry.type
class Query:
    nothing: int = 0


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def events(self) -> AsyncGenerator[Event, None]:
        for event in EVENTS:
            yield event


# As the app's schema: a document's text parses to one node, which the results are kept for.
schema = strawberry.Schema(
    query=Query,
    subscription=Subscription,
    extensions=[ParserCache],
    execution_context_class=SharingExecutor,
)
DOCUMENT = 'subscription ($p: String! = "") { events { shown(prefix: $p) } }'


@dataclass
class Caller:
    team: Team | None


TEAMS = {"team-a": Team(id=1, name="team-a"), "team-b": Team(id=2, name="team-b")}


def new_events() -> None:
    calls.clear()
    EVENTS[:] = [Event(text="one"), Event(text="two")]


async def results(team: str, **variables: Any) -> list[Any]:
    caller = Caller(TEAMS[team])
    stream = await schema.subscribe(DOCUMENT, variable_values=variables, context_value=caller)
    assert not hasattr(stream, "errors"), stream
    return [result async for result in stream]


async def test_one_team_with_one_document_and_variables_executes_each_event_once() -> None:
    new_events()
    first, second = await results("team-a"), await results("team-a")
    assert (
        [r.data for r in first]
        == [r.data for r in second]
        == [
            {"events": {"shown": "one"}},
            {"events": {"shown": "two"}},
        ]
    )
    assert calls == ["one", "two"]
    assert first[0].data is second[0].data  # the very same result, which encodes once
    message = {"id": "7", "type": "next", "payload": {"data": second[0].data}}
    assert json.loads(encode_message(message)) == message


async def test_teams_never_share_a_result() -> None:
    new_events()
    a, b = await results("team-a"), await results("team-b")
    assert [r.data for r in a] == [r.data for r in b]
    assert calls == ["one", "two", "one", "two"]
    assert a[0].data is not b[0].data


async def test_other_variables_execute_apart() -> None:
    new_events()
    plain, prefixed = await results("team-a"), await results("team-a", p="> ")
    assert prefixed[0].data == {"events": {"shown": "> one"}}
    assert plain[0].data == {"events": {"shown": "one"}}
    assert calls == ["one", "two", "one", "two"]

"""Per-team budgets: operations in a moving window (HTTP and both WebSocket protocols) and
concurrent execs, each refused with RATE_LIMITED and retryAfterSec; in Redis, shared by replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest
from gql import GraphQLRequest
from gql.transport.exceptions import TransportQueryError

from app.agent.server import AgentHandle
from app.config import Settings
from tests.e2e.client import PROTOCOLS, Answer, HttpClient, document, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start, wait_for_status

DEADLINE_SEC = 20
REDIS = "redis://127.0.0.1:6379"
LIST = "query { capsules { id } }"
# An exec that says it runs (a file started-PID), then runs until a file go appears beside it.
HOLD = {"cmd": "sh", "args": ["-c", "touch started-$$; while [ ! -e go ]; do sleep 0.02; done; echo done"]}

WINDOW_SEC = 3


def with_budget(settings: Settings) -> Settings:
    """Three operations in any window of three seconds."""
    return replace(settings, team_requests_per_sec=1.0, team_request_window_sec=WINDOW_SEC)


def refusal(answer: Answer) -> dict[str, Any]:
    """The one RATE_LIMITED error of an answer, with no data."""
    assert answer.data is None, answer
    [error] = answer.errors
    assert error["extensions"]["code"] == "RATE_LIMITED", error
    return dict(error)


async def until_refused(call: Callable[[], Any]) -> dict[str, Any]:
    """Calls until an answer is RATE_LIMITED; the calls before it must succeed."""
    async with asyncio.timeout(DEADLINE_SEC):
        while True:
            answer: Answer = await call()
            if answer.errors:
                return refusal(answer)
            assert answer.data is not None


async def until_running(api: HttpClient, capsule_id: str, count: int) -> None:
    """Waits until count HOLD execs run in the capsule (each has its slot by then)."""
    check = f"test $(ls started-* 2>/dev/null | wc -l) -ge {count}"
    async with asyncio.timeout(DEADLINE_SEC):
        while True:
            probe = await start(api, capsule_id, "sh", "-c", check)
            if (await wait_for_status(api, capsule_id, str(probe["pid"]), "EXITED"))["exitCode"] == 0:
                return


@pytest.fixture
async def budgeted(settings: Settings) -> AsyncIterator[Server]:
    async with running_server(with_budget(settings)) as server:
        yield server


async def test_http_over_budget_is_refused_until_retry_after(budgeted: Server) -> None:
    a = HttpClient(budgeted.url, await budgeted.new_key("team-a"))
    b = HttpClient(budgeted.url, await budgeted.new_key("team-b"))
    try:
        error = await until_refused(lambda: a.query(LIST))
        retry_after = error["extensions"]["retryAfterSec"]
        assert isinstance(retry_after, float | int)
        assert 0 < retry_after <= WINDOW_SEC + 0.01
        assert "retry in" in error["message"]
        raw = await a.http.post(a.url, json={"query": LIST})
        assert raw.status_code == 200
        assert int(raw.headers["retry-after"]) >= 1
        body = raw.json()
        # Another team has a budget of its own.
        assert (await b.query(LIST)).ok()["capsules"] == []
        # The server says when a retry succeeds: wait that long, and it does.
        await asyncio.sleep(
            refusal(Answer(data=body["data"], errors=body["errors"]))["extensions"]["retryAfterSec"]
        )
        assert (await a.query(LIST)).ok()["capsules"] == []
    finally:
        await a.aclose()
        await b.aclose()


async def test_graphql_response_media_type_answers_429(budgeted: Server) -> None:
    a = HttpClient(budgeted.url, await budgeted.new_key("team-a"))
    try:
        await until_refused(lambda: a.query(LIST))
        headers = {"Accept": "application/graphql-response+json"}
        raw = await a.http.post(a.url, json={"query": LIST}, headers=headers)
        assert raw.status_code == 429
        assert raw.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
        assert "data" not in raw.json()
    finally:
        await a.aclose()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_websocket_subscribes_count_and_the_connection_goes_on(budgeted: Server, protocol: str) -> None:
    key = await budgeted.new_key("team-a")
    # A subscription to no capsule ends at once, with NOT_FOUND once it runs.
    request = GraphQLRequest(document("ProcessEvents"), variable_values={"capsuleId": "none"})

    async with ws_session(budgeted.ws_url, key, protocol) as session:

        async def subscribe() -> list[dict[str, Any]]:
            with pytest.raises(TransportQueryError) as refused:
                async for _ in session.subscribe(request):
                    pass
            assert refused.value.errors is not None
            return list(refused.value.errors)

        async with asyncio.timeout(DEADLINE_SEC):
            while (errors := await subscribe())[0]["extensions"]["code"] == "NOT_FOUND":
                pass
        [error] = errors
        assert error["extensions"]["code"] == "RATE_LIMITED"
        retry_after = error["extensions"]["retryAfterSec"]
        assert 0 < retry_after <= WINDOW_SEC + 0.01
        await asyncio.sleep(retry_after)
        # The same connection, still served.
        assert (await subscribe())[0]["extensions"]["code"] == "NOT_FOUND"


async def test_concurrent_execs_over_the_limit_are_refused(settings: Settings) -> None:
    async with running_server(replace(settings, team_max_concurrent_execs=2)) as server:
        a = HttpClient(server.url, await server.new_key("team-a"))
        b = HttpClient(server.url, await server.new_key("team-b"))
        try:
            capsule_id = (await a.run("CreateCapsule")).ok()["createCapsule"]["id"]
            b_capsule = (await b.run("CreateCapsule")).ok()["createCapsule"]["id"]
            held = [asyncio.create_task(a.run("Exec", capsuleId=capsule_id, input=HOLD)) for _ in range(2)]
            await until_running(a, capsule_id, 2)
            error = refusal(await a.run("Exec", capsuleId=capsule_id, input={"cmd": "true"}))
            assert error["extensions"]["retryAfterSec"] > 0
            assert "execs at once" in error["message"]
            assert not any(task.done() for task in held)
            # Another team's execs run meanwhile; background processes are no execs.
            ran = await b.run("Exec", capsuleId=b_capsule, input={"cmd": "echo", "args": ["b"]})
            assert ran.ok()["exec"]["stdout"] == "b\n"
            await start(a, capsule_id, "touch", "go")
            async with asyncio.timeout(DEADLINE_SEC):
                for answer in await asyncio.gather(*held):
                    assert answer.ok()["exec"]["stdout"] == "done\n"
            # Their slots are free again.
            again = await a.run("Exec", capsuleId=capsule_id, input={"cmd": "echo", "args": ["again"]})
            assert again.ok()["exec"]["stdout"] == "again\n"
        finally:
            await a.aclose()
            await b.aclose()


async def test_replicas_on_redis_share_one_budget(settings: Settings, agent: AgentHandle) -> None:
    shared = replace(with_budget(settings), hosts={"h1": f"127.0.0.1:{agent.port}"}, bus_url=REDIS)
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_server(shared))
        second = await stack.enter_async_context(running_server(shared))
        key = await first.new_key("team-a")
        one, two = HttpClient(first.url, key), HttpClient(second.url, key)
        stack.push_async_callback(one.aclose)
        stack.push_async_callback(two.aclose)
        # What the first replica counted, the second refuses.
        await until_refused(lambda: one.query(LIST))
        error = refusal(await two.query(LIST))
        await asyncio.sleep(error["extensions"]["retryAfterSec"])
        assert (await two.query(LIST)).ok()["capsules"] == []


async def test_replicas_on_redis_share_exec_slots(settings: Settings, agent: AgentHandle) -> None:
    shared = replace(
        settings, hosts={"h1": f"127.0.0.1:{agent.port}"}, bus_url=REDIS, team_max_concurrent_execs=1
    )
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_server(shared))
        second = await stack.enter_async_context(running_server(shared))
        key = await first.new_key("team-a")
        one, two = HttpClient(first.url, key), HttpClient(second.url, key)
        stack.push_async_callback(one.aclose)
        stack.push_async_callback(two.aclose)
        capsule_id = (await one.run("CreateCapsule")).ok()["createCapsule"]["id"]
        held = asyncio.create_task(one.run("Exec", capsuleId=capsule_id, input=HOLD))
        await until_running(two, capsule_id, 1)
        error = refusal(await two.run("Exec", capsuleId=capsule_id, input={"cmd": "true"}))
        assert "execs at once" in error["message"]
        await start(two, capsule_id, "touch", "go")
        async with asyncio.timeout(DEADLINE_SEC):
            assert (await held).ok()["exec"]["stdout"] == "done\n"
        ran = await two.run("Exec", capsuleId=capsule_id, input={"cmd": "echo", "args": ["freed"]})
        assert ran.ok()["exec"]["stdout"] == "freed\n"

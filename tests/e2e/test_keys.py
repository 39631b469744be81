"""Revoking an API key: new requests and open WebSockets of that key end, the team's other keys work on;
and no key ever reaches a log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import websockets
from gql.transport.exceptions import TransportQueryError
from websockets.typing import Subprotocol

from app.api.revocation import REVOKED
from app.config import Settings
from app.services.keys import SHOWN_PREFIX_LEN
from tests.cli.test_main import run as run_capsule
from tests.e2e.client import PROTOCOLS, HttpClient, document, subscribe, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start

TICKER = "while :; do echo tick; sleep 0.2; done"
# From the revocation to the end of every subscription it held open: generous, for a loaded machine.
DEADLINE_SEC = 20
CLIENT_LOGGERS = ("gql", "websockets.client", "httpx", "httpcore")
# SQLite only: revocation over PostgreSQL (and Redis) is test_replicas' part.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@dataclass
class Follower:
    """One subscription read in the background: live once a first result came, then how it ended."""

    name: str
    task: asyncio.Task[BaseException | None]
    live: asyncio.Event

    async def ended(self) -> BaseException | None:
        """The exception the subscription ended with (None when it completed)."""
        return await self.task


def follow(session: Any, name: str, **variables: Any) -> Follower:
    live = asyncio.Event()

    async def read() -> BaseException | None:
        try:
            async for _ in subscribe(session, name, **variables):
                live.set()
        except Exception as exc:
            return exc
        return None

    return Follower(name=name, task=asyncio.create_task(read()), live=live)


async def until_live(api: HttpClient, capsule_id: str, followers: list[Follower]) -> None:
    """Starts short processes until every follower has had a result (processEvents needs events)."""
    async with asyncio.timeout(DEADLINE_SEC):
        while not all(f.live.is_set() for f in followers):
            for follower in followers:
                if follower.task.done():
                    raise AssertionError(f"{follower.name} ended early: {follower.task.result()!r}")
            await start(api, capsule_id, "true")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(f.live.wait() for f in followers)), 0.3)


def assert_unauthenticated(ended: BaseException | None) -> None:
    assert isinstance(ended, TransportQueryError), repr(ended)
    assert ended.errors is not None
    assert [e.get("extensions", {}).get("code") for e in ended.errors] == ["UNAUTHENTICATED"]
    assert ended.errors[0]["message"] == REVOKED


@contextlib.asynccontextmanager
async def followed(
    stack: AsyncExitStack, url: str, key: str, capsule_id: str, ticker_pid: int
) -> AsyncIterator[list[Follower]]:
    """processOutput of the ticker and processEvents of the capsule, over each protocol."""
    followers = []
    for protocol in PROTOCOLS:
        session = await stack.enter_async_context(ws_session(url, key, protocol))
        followers.append(follow(session, "ProcessOutput", capsuleId=capsule_id, selector=str(ticker_pid)))
        followers.append(follow(session, "ProcessEvents", capsuleId=capsule_id))
    try:
        yield followers
    finally:
        for follower in followers:
            follower.task.cancel()
        await asyncio.wait([f.task for f in followers])


async def key_id(server: Server, key: str) -> int:
    credential = await server.state.platform.keys.credential(key)
    assert credential is not None
    return credential.key_id


async def revoke_with_the_cli(settings: Settings, tmp_path: Path, key_id: int) -> None:
    """`capsule keys revoke ID` as an operator runs it: a process of its own, on the store and bus."""
    revoked = await asyncio.to_thread(
        run_capsule,
        tmp_path,
        settings.database_url,
        "keys",
        "revoke",
        str(key_id),
        CAPSULE_BUS_URL=settings.bus_url,
    )
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked API key {key_id} " in revoked.stdout


async def test_revoked_key_ends_its_requests_and_subscriptions(settings: Settings, tmp_path: Path) -> None:
    # The CLI's memory bus reaches no server: this is the periodic re-check's work.
    async with (
        running_server(replace(settings, key_recheck_interval_sec=0.3)) as server,
        AsyncExitStack() as stack,
    ):
        key, other = await server.new_key("team-a"), await server.new_key("team-a")
        api, other_api = HttpClient(server.url, key), HttpClient(server.url, other)
        stack.push_async_callback(api.aclose)
        stack.push_async_callback(other_api.aclose)
        capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
        ticker = await start(api, capsule_id, "sh", "-c", TICKER, tag="ticker")
        revoked_followers = await stack.enter_async_context(
            followed(stack, server.ws_url, key, capsule_id, ticker["pid"])
        )
        kept_followers = await stack.enter_async_context(
            followed(stack, server.ws_url, other, capsule_id, ticker["pid"])
        )
        await until_live(api, capsule_id, revoked_followers + kept_followers)

        await revoke_with_the_cli(settings, tmp_path, await key_id(server, key))

        async with asyncio.timeout(DEADLINE_SEC):
            for follower in revoked_followers:
                assert_unauthenticated(await follower.ended())
        answer = await api.run("Capsule", id=capsule_id)
        assert answer.codes == ["UNAUTHENTICATED"]
        # The team's other key: its requests and its subscriptions go on.
        assert (await other_api.run("Capsule", id=capsule_id)).ok()["capsule"]["id"] == capsule_id
        for follower in kept_followers:
            follower.live.clear()
        await until_live(other_api, capsule_id, kept_followers)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_socket_says_why_and_closes_with_4403(server: Server, protocol: str) -> None:
    key = await server.new_key("team-a")
    api = HttpClient(server.url, key)
    try:
        capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
        ticker = await start(api, capsule_id, "sh", "-c", TICKER, tag="ticker")
        async with websockets.connect(server.ws_url, subprotocols=[Subprotocol(protocol)]) as ws:
            await ws.send(
                json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}})
            )
            subscribe_type = "subscribe" if protocol == "graphql-transport-ws" else "start"
            query = {
                "query": document("ProcessOutput"),
                "variables": {"capsuleId": capsule_id, "selector": "ticker"},
            }
            await ws.send(json.dumps({"id": "out", "type": subscribe_type, "payload": query}))
            messages: list[dict[str, Any]] = []
            async with asyncio.timeout(DEADLINE_SEC):
                while not any(m["type"] in ("next", "data") for m in messages):
                    messages.append(json.loads(await ws.recv()))
                # The server's own revocation goes over its bus: no periodic check needed.
                assert await server.state.platform.keys.revoke(key)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        messages.append(json.loads(await ws.recv()))
        assert ticker["pid"] > 0
        last = [m for m in messages if m.get("id") == "out"][-1]
        assert last["type"] == "error"
        error = last["payload"][0] if protocol == "graphql-transport-ws" else last["payload"]
        assert error["extensions"]["code"] == "UNAUTHENTICATED" and error["message"] == REVOKED
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, REVOKED)
    finally:
        await api.aclose()


async def test_keys_never_reach_a_log(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = await server.new_key("team-a")
    wrong = "cap_" + "W" * 43
    tried = [key, wrong, "cap_malformed-" + "M" * 20]
    for attempt in tried:
        client = HttpClient(server.url, attempt)
        try:
            await client.run("Capsules")
            await client.query("{ nope }")  # a validation error on top
        finally:
            await client.aclose()
    for protocol, attempt, header in itertools.product(PROTOCOLS, tried, (False, True)):
        with contextlib.suppress(Exception):  # NOT_FOUND for the good key, refused for the rest
            async with ws_session(server.ws_url, attempt, protocol, header=header) as session:
                async for _ in subscribe(session, "ProcessEvents", capsuleId="cap-none"):
                    break
    assert await server.state.platform.keys.revoke(key)
    revoked = HttpClient(server.url, key)
    try:
        assert (await revoked.run("Capsules")).codes == ["UNAUTHENTICATED"]
    finally:
        await revoked.aclose()
    # Everything the server's side logged; the test's own clients (gql, websockets, httpx) log what
    # they send, key included, at DEBUG.
    server_records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in server_records)
    assert "revoked API key" in logged  # the log did record what happened
    for attempt in tried:
        assert attempt not in logged
        assert attempt[SHOWN_PREFIX_LEN:] not in logged

"""processEvents with a cursor: resumed after a disconnect, across two replicas and a Redis restart
for real, on the embedded default's memory bus too; bad and expired cursors."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from gql.transport.exceptions import TransportQueryError

from app.agent.server import AgentHandle
from app.config import Settings
from app.domain import EventRetention
from app.services.events import EventPruner, encode_cursor
from tests.bus.test_broadcast import REDIS_URL
from tests.e2e.client import HttpClient, subscribe, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start
from tests.redis_server import PrivateRedis, private_redis

POSTGRES_BUS = "postgres://postgres@127.0.0.1:5432/test"
DEADLINE_SEC = 30.0
PROBE = "probe-"
on_postgres = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@dataclass
class Follower:
    """A processEvents subscription collecting every event it gets, in a task of its own."""

    events: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def real(self) -> list[tuple[str, str]]:
        """(kind, tag) of every event but the probes', in the order they came."""
        return [
            (e["kind"], e["process"]["tag"]) for e in self.events if not e["process"]["tag"].startswith(PROBE)
        ]

    @property
    def cursor(self) -> str:
        return str(self.events[-1]["cursor"])

    async def until(self, check: Callable[[Follower], bool], what: str) -> None:
        try:
            async with asyncio.timeout(DEADLINE_SEC):
                while not check(self):
                    if self.task is not None and self.task.done():
                        self.task.result()
                        pytest.fail(f"the subscription ended before {what}: {self.events}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pytest.fail(f"still waiting for {what}; got {self.real()}")

    async def exited(self, tags: Iterable[str]) -> None:
        wanted = set(tags)
        await self.until(lambda f: wanted <= {t for k, t in f.real() if k == "EXITED"}, f"EXITED of {wanted}")


@asynccontextmanager
async def following(
    url: str, key: str, protocol: str, capsule_id: str, *, after: str | None = None
) -> AsyncIterator[Follower]:
    """A Follower on its own WebSocket until the block ends (then its socket closes)."""
    follower = Follower()
    async with ws_session(url, key, protocol) as session:

        async def collect() -> None:
            async for result in subscribe(session, "ProcessEvents", capsuleId=capsule_id, after=after):
                follower.events.append(result["processEvents"])

        follower.task = asyncio.create_task(collect())
        try:
            yield follower
        finally:
            follower.task.cancel()
            await asyncio.gather(follower.task, return_exceptions=True)


async def until_live(api: HttpClient, capsule_id: str, followers: Iterable[Follower]) -> None:
    """Starts probe processes until every follower has got an event: each is then receiving."""
    pending = list(followers)
    async with asyncio.timeout(DEADLINE_SEC):
        while pending:
            await start(api, capsule_id, "true", tag=f"{PROBE}{secrets.token_hex(4)}")
            await asyncio.sleep(0.1)
            pending = [f for f in pending if not f.events]


def assert_each_once(follower: Follower, tags: Iterable[str]) -> None:
    """Every tag's STARTED then EXITED, each exactly once; no event (probes too) twice."""
    seen = follower.real()
    for tag in tags:
        mine = [kind for kind, t in seen if t == tag]
        assert mine == ["STARTED", "EXITED"], (tag, seen)
    cursors = [e["cursor"] for e in follower.events]
    assert len(cursors) == len(set(cursors)), cursors


async def run_to_exit(api: HttpClient, capsule_id: str, tag: str) -> None:
    """Starts a process that exits at once and waits until its exit is on record.

    The `process` query answers from the host, which knows of an exit before the replica's exit
    recorder has written it; waitForProcess with timeoutSec 0 answers with the record as it is (and
    needs no bus news, which a test of a bus outage has none of), so a process started after this
    returns has its events after this one's EXITED."""
    await start(api, capsule_id, "sh", "-c", "exit 4", tag=tag)
    async with asyncio.timeout(DEADLINE_SEC):
        while True:
            answer = await api.run(
                "WaitForProcess", capsuleId=capsule_id, selector=tag, until="EXITED", timeoutSec=0
            )
            if answer.ok()["waitForProcess"]["status"] == "EXITED":
                return
            await asyncio.sleep(0.02)


async def resumed_sees_what_it_missed(
    live: Server, other: Server, key: str, capsule_id: str, protocols: tuple[str, str]
) -> None:
    """Follows on `live`, disconnects, lets processes start and end through `other`, then resumes on
    `live` with the last cursor: every event it missed, in order, none twice, then live ones."""
    api = HttpClient(other.url, key)
    try:
        async with following(live.ws_url, key, protocols[0], capsule_id) as first:
            await until_live(api, capsule_id, [first])
            await run_to_exit(api, capsule_id, "before")
            await first.exited(["before"])
        cursor = first.cursor
        await run_to_exit(api, capsule_id, "missed-1")
        sleeper = await start(api, capsule_id, "sleep", "1000", tag="missed-2")
        stopped = await api.run("StopProcess", capsuleId=capsule_id, selector=sleeper["tag"], graceSec=0)
        assert stopped.ok()["stopProcess"]["status"] == "EXITED"
        async with following(live.ws_url, key, protocols[1], capsule_id, after=cursor) as resumed:
            await resumed.exited(["missed-1", "missed-2"])
            await run_to_exit(api, capsule_id, "after")
            await resumed.exited(["after"])
        assert resumed.real() == [
            ("STARTED", "missed-1"),
            ("EXITED", "missed-1"),
            ("STARTED", "missed-2"),
            ("EXITED", "missed-2"),
            ("STARTED", "after"),
            ("EXITED", "after"),
        ]
        assert cursor not in [e["cursor"] for e in resumed.events]
        assert all(e["at"] for e in resumed.events)
        exited = resumed.events[1]["process"]
        assert (exited["status"], exited["exitCode"]) == ("EXITED", 4)
    finally:
        await api.aclose()


@on_postgres
@pytest.mark.parametrize("bus_url", [REDIS_URL, POSTGRES_BUS], ids=["redis", "postgres"])
async def test_two_replicas_resume_with_the_last_cursor(
    settings: Settings, agent: AgentHandle, bus_url: str
) -> None:
    shared = replace(settings, hosts={"h1": f"127.0.0.1:{agent.port}"}, bus_url=bus_url)
    async with running_server(shared) as first, running_server(shared) as second:
        key = await first.new_key("team-a")
        capsule_id = (await HttpClient(first.url, key).run("CreateCapsule")).ok()["createCapsule"]["id"]
        await resumed_sees_what_it_missed(
            second, first, key, capsule_id, ("graphql-transport-ws", "graphql-ws")
        )


@pytest.mark.parametrize(
    "protocols", [("graphql-transport-ws", "graphql-ws"), ("graphql-ws", "graphql-transport-ws")]
)
async def test_the_embedded_default_resumes_with_the_last_cursor(
    server: Server, key: str, capsule_id: str, protocols: tuple[str, str]
) -> None:
    assert server.state.settings.bus_url == "memory://"
    await resumed_sees_what_it_missed(server, server, key, capsule_id, protocols)


@on_postgres
async def test_events_whose_news_is_lost_come_by_the_poll(settings: Settings, agent: AgentHandle) -> None:
    # Each replica on a memory bus of its own: no news of the other's events ever reaches it.
    alone = replace(settings, hosts={"h1": f"127.0.0.1:{agent.port}"}, events_poll_sec=0.2)
    async with running_server(alone) as first, running_server(alone) as second:
        key = await first.new_key("team-a")
        api = HttpClient(first.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            async with following(second.ws_url, key, "graphql-ws", capsule_id) as follower:
                await until_live(api, capsule_id, [follower])
                await run_to_exit(api, capsule_id, "unannounced")
                await follower.exited(["unannounced"])
            assert_each_once(follower, ["unannounced"])
        finally:
            await api.aclose()


@on_postgres
async def test_a_redis_restart_loses_no_event(settings: Settings, agent: AgentHandle) -> None:
    # No poll to speak of: what the outage held back must come once the bus is back. The Redis is the
    # test's own, shut down and started again on its port (the machine's serves other tests).
    async with private_redis() as bus:
        await bus.start()
        shared = replace(
            settings, hosts={"h1": f"127.0.0.1:{agent.port}"}, bus_url=bus.url, events_poll_sec=3600.0
        )
        await _restart_loses_no_event(shared, bus)


async def _restart_loses_no_event(shared: Settings, bus: PrivateRedis) -> None:
    async with running_server(shared) as first, running_server(shared) as second, AsyncExitStack() as stack:
        key = await first.new_key("team-a")
        api = HttpClient(first.url, key)
        stack.push_async_callback(api.aclose)
        capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
        kept = [
            await stack.enter_async_context(following(server.ws_url, key, protocol, capsule_id))
            for server in (first, second)
            for protocol in ("graphql-transport-ws", "graphql-ws")
        ]
        printer = await start(
            api, capsule_id, "sh", "-c", "while true; do echo tick; sleep 0.1; done", tag="printer"
        )
        output = await stack.enter_async_context(ws_session(second.ws_url, key, "graphql-transport-ws"))
        chunks = subscribe(output, "ProcessOutput", capsuleId=capsule_id, selector=printer["tag"])
        async with asyncio.timeout(DEADLINE_SEC):
            await anext(chunks)
        await until_live(api, capsule_id, kept)
        async with following(second.ws_url, key, "graphql-ws", capsule_id) as leaving:
            await until_live(api, capsule_id, [leaving])
            await run_to_exit(api, capsule_id, "before")
            await leaving.exited(["before"])

        await bus.stop()
        try:
            # Started and ended while the bus is down: recorded, announced to nobody.
            await run_to_exit(api, capsule_id, "during")
        finally:
            await bus.start()
        await run_to_exit(api, capsule_id, "after")
        tags = ["before", "during", "after"]
        resumed = await stack.enter_async_context(
            following(first.ws_url, key, "graphql-transport-ws", capsule_id, after=leaving.cursor)
        )
        for follower in kept:
            await follower.exited(tags)
        await resumed.exited(tags[1:])
        for follower in kept:
            assert_each_once(follower, tags)
        assert_each_once(resumed, tags[1:])
        assert ("STARTED", "before") not in resumed.real()
        # processOutput never used the bus: its stream went on through the restart.
        async with asyncio.timeout(DEADLINE_SEC):
            assert (await anext(chunks))["processOutput"]["data"].startswith("tick")
        # And news goes on arriving as before the restart.
        await run_to_exit(api, capsule_id, "later")
        for follower in kept:
            await follower.exited(["later"])
            assert_each_once(follower, [*tags, "later"])


async def refused(
    server: Server, key: str, protocol: str, capsule_id: str, after: str
) -> TransportQueryError:
    async with ws_session(server.ws_url, key, protocol) as session, asyncio.timeout(DEADLINE_SEC):
        with pytest.raises(TransportQueryError) as caught:
            async for _ in subscribe(session, "ProcessEvents", capsuleId=capsule_id, after=after):
                pass
    return caught.value


def code_of(error: TransportQueryError) -> Any:
    return (error.errors or [{}])[0].get("extensions", {}).get("code")


@pytest.mark.parametrize("protocol", ["graphql-transport-ws", "graphql-ws"])
async def test_bad_cursors_are_invalid_requests(settings: Settings, protocol: str) -> None:
    async with running_server(replace(settings, event_retention=EventRetention(max_per_capsule=3))) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            other_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            async with following(server.ws_url, key, protocol, capsule_id) as follower:
                await until_live(api, capsule_id, [follower])
                oldest = follower.events[0]["cursor"]
                for number in range(3):
                    await run_to_exit(api, capsule_id, f"filler-{number}")
                await follower.exited([f"filler-{number}" for number in range(3)])
            for garbage in ("", "not a cursor", "%%%", "Y2FwLTE6eA", oldest + "x"):
                error = await refused(server, key, protocol, capsule_id, garbage)
                assert code_of(error) == "INVALID_REQUEST", (garbage, error)
                assert "not a cursor of this capsule's events" in str(error)
            # Another capsule's cursor, of the same team even, says no more than garbage does.
            error = await refused(server, key, protocol, other_id, follower.cursor)
            assert code_of(error) == "INVALID_REQUEST"
            assert "not a cursor of this capsule's events" in str(error)
            # Past its newest event: no cursor the server gave out.
            future = encode_cursor(capsule_id, 10_000)
            assert code_of(await refused(server, key, protocol, capsule_id, future)) == "INVALID_REQUEST"
            # Three events retained per capsule here: the first one's successors are gone.
            error = await refused(server, key, protocol, capsule_id, oldest)
            assert code_of(error) == "INVALID_REQUEST"
            assert "list the processes" in str(error) and "without after" in str(error)
            # The newest cursor still resumes.
            async with following(server.ws_url, key, protocol, capsule_id, after=follower.cursor) as resumed:
                await run_to_exit(api, capsule_id, "next")
                await resumed.exited(["next"])
            assert resumed.real() == [("STARTED", "next"), ("EXITED", "next")]
        finally:
            await api.aclose()


async def test_a_cursor_past_the_age_limit_is_expired(
    server: Server, key: str, api: HttpClient, capsule_id: str
) -> None:
    async with following(server.ws_url, key, "graphql-transport-ws", capsule_id) as follower:
        await until_live(api, capsule_id, [follower])
        await run_to_exit(api, capsule_id, "old")
        await follower.exited(["old"])
    cursor = follower.events[0]["cursor"]
    # The server's own pruner runs once a minute; this one, with a retention of nothing, runs now.
    pruner = EventPruner(db=server.state.platform.db, retention=EventRetention(max_age_sec=1e-6))
    assert await pruner.prune_once() >= 3
    error = await refused(server, key, "graphql-ws", capsule_id, cursor)
    assert code_of(error) == "INVALID_REQUEST"
    assert "no longer retained" in str(error)

"""What an operator sees of a running server: /metrics counted against a scripted workload, /readyz
as the store, the bus and the hosts come and go, and a separate agent's restart noticed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.agent.server import AgentHandle, start_agent
from app.config import Settings
from tests.agent.helpers import eventually
from tests.e2e.client import HttpClient, subscribe, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start, wait_for_status
from tests.redis_server import private_redis
from tests.system import free_port

DEADLINE_SEC = 15.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def base_url(server: Server) -> str:
    return server.url.removesuffix("/graphql")


async def scrape(server: Server) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{base_url(server)}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def until(check: Callable[[], Any], what: str, deadline: float = DEADLINE_SEC) -> Any:
    """Polls an async or plain check until it is truthy (tests/agent/helpers.py's eventually)."""
    return await eventually(check, within=deadline, what=what)


async def readyz(server: Server) -> tuple[int, dict[str, Any], float]:
    """/readyz's status, its JSON body and how long it took to answer."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{base_url(server)}/readyz")
    return response.status_code, response.json(), loop.time() - started


async def test_metrics_count_what_a_workload_did(server: Server, key: str, api: HttpClient) -> None:
    before = await scrape(server)
    capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
    zero = await start(api, capsule_id, "sh", "-c", "exit 0", tag="zero")
    failing = await start(api, capsule_id, "sh", "-c", "exit 3", tag="failing")
    killed = await start(api, capsule_id, "sleep", "1000", tag="killed")
    await start(api, capsule_id, "sh", "-c", "echo hi; exec sleep 1000", tag="running")
    talker = await start(
        api, capsule_id, "sh", "-c", "printf 'one\\ntwo\\n'; printf 'three\\n' >&2", tag="talker"
    )
    (await api.run("SignalProcess", capsuleId=capsule_id, selector="killed", signal="SIGKILL")).ok()
    for process in (zero, failing, killed, talker):
        await wait_for_status(api, capsule_id, process["tag"], "EXITED")
    missing = await api.run("Process", capsuleId="nosuchcapsule", selector="1")
    assert missing.codes == ["NOT_FOUND"]

    received: list[dict[str, Any]] = []
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector="talker"):
            received.append(result["processOutput"])
        assert received[-1]["__typename"] == "ProcessExited"
        # One that stays open: seen while it runs, counted once it is closed.
        async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector="running"):
            received.append(result["processOutput"])
            during = await scrape(server)
            break

    after = await until(lambda: _settled(server), "the subscription's end counted", deadline=DEADLINE_SEC)
    started = delta(before, after, "capsule_processes_started_total")
    assert started == 5
    exits = {
        outcome: delta(before, after, "capsule_processes_exited_total", outcome=outcome)
        for outcome in ("zero", "non_zero", "signal")
    }
    assert exits == {"zero": 2, "non_zero": 1, "signal": 1}  # the talker exits 0 too
    assert delta(before, after, "capsule_host_calls_total", method="StartProcess", status="OK") == 5
    assert delta(before, after, "capsule_host_calls_total", method="CreateCapsule", status="OK") == 1
    assert delta(before, after, "capsule_host_call_seconds_count", method="StartProcess") == 5
    assert (
        delta(
            before,
            after,
            "capsule_graphql_operations_total",
            type="mutation",
            operation="startProcess",
            code="none",
        )
        == 5
    )
    assert (
        delta(
            before,
            after,
            "capsule_graphql_operations_total",
            type="query",
            operation="process",
            code="NOT_FOUND",
        )
        == 1
    )
    assert (
        delta(
            before,
            after,
            "capsule_graphql_operation_seconds_count",
            type="mutation",
            operation="startProcess",
        )
        == 5
    )
    # The subscription: counted once, when its stream ended; open while it ran.
    assert (
        delta(
            before,
            after,
            "capsule_graphql_operations_total",
            type="subscription",
            operation="processOutput",
            code="none",
        )
        == 2
    )
    assert value(during, "capsule_ws_connections", protocol="graphql-transport-ws") >= 1
    assert value(during, "capsule_ws_subscriptions", operation="processOutput") == 1
    assert value(after, "capsule_ws_subscriptions", operation="processOutput") == 0
    # Output: every event the subscriber got, and the bytes of its chunks' data.
    chunks = [e for e in received if e["__typename"] == "OutputChunk"]
    assert delta(before, after, "capsule_output_events_total") == len(received)
    assert delta(before, after, "capsule_output_bytes_total") == sum(len(c["data"].encode()) for c in chunks)
    assert "".join(c["data"] for c in chunks).count("\n") == 4
    # What runs, read from the store at the scrape; and the bus carried the lifecycle events.
    assert value(after, "capsule_processes_running", host="local") == 1
    assert value(after, "capsule_capsules", host="local", status="RUNNING") == 1
    # At most one announcement per lifecycle event (5 starts, 4 exits); events written together
    # share one.
    assert 1 <= delta(before, after, "capsule_bus_publishes_total", outcome="ok") <= 9
    assert value(after, "capsule_host_reachable", host="local") == 1
    # The embedded agent's own metrics are on the same page.
    assert value(after, "capsule_agent_processes_running", capsule=capsule_id) == 1
    assert value(after, "capsule_agent_capsules") >= 1
    # No team name, key or capsule id in any label of the server's own families.
    team = "team-a"
    for name, labels in after:
        if not name.startswith("capsule_agent_"):
            assert all(team not in v and key not in v and capsule_id not in v for _, v in labels), name


async def _settled(server: Server) -> Samples | None:
    samples = await scrape(server)
    ended = value(samples, "capsule_ws_subscriptions", operation="processOutput") == 0
    return samples if ended else None


async def test_rate_limit_refusals_and_auth_failures_are_counted(
    settings: Settings, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(
        replace(settings, team_requests_per_sec=1.0, team_request_window_sec=2)
    ) as server:
        key = await server.new_key("team-a")
        before = await scrape(server)
        api = HttpClient(server.url, key)
        wrong = HttpClient(server.url, "cap_wrongwrongwrong")
        try:
            answers = [await api.run("Capsules") for _ in range(4)]
            refused = sum(1 for a in answers if a.codes == ["RATE_LIMITED"])
            assert refused >= 1
            assert (await wrong.run("Capsules")).codes == ["UNAUTHENTICATED"]
        finally:
            await api.aclose()
            await wrong.aclose()
        after = await scrape(server)
        assert delta(before, after, "capsule_rate_limit_refusals_total", limit="operations") == refused
        assert delta(before, after, "capsule_auth_failures_total") == 1
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "auth.failed"]
    assert len(refusals) == 1 and refusals[0].levelname == "WARNING"
    assert all("wrongwrong" not in r.getMessage() for r in caplog.records), "a key was logged"


async def test_healthz_and_readyz_when_all_is_well(server: Server) -> None:
    async with httpx.AsyncClient() as client:
        alive = await client.get(f"{base_url(server)}/healthz")
    assert alive.status_code == 200 and alive.json() == {"status": "ok"}
    status, body, took = await readyz(server)
    assert status == 200, body
    assert body == {
        "status": "ready",
        "checks": {"store": "ok", "bus": "ok", "hosts": "ok", "migrations": "ok"},
    }
    assert took < 1.0


async def test_readyz_names_migrations_that_are_not_current(server: Server) -> None:
    db = server.state.platform.db
    async with db.session() as session:
        connection = await session.connection()
        (head,) = (await connection.execute(text("SELECT version_num FROM alembic_version"))).one()
    async with db.transaction() as session:
        await (await session.connection()).execute(text("UPDATE alembic_version SET version_num = 'older'"))
    try:
        status, body, _ = await readyz(server)
        assert status == 503
        assert body["failed"] == ["migrations"]
        assert "capsule migrate" in body["checks"]["migrations"]
    finally:
        async with db.transaction() as session:
            update = text("UPDATE alembic_version SET version_num = :v").bindparams(v=head)
            await (await session.connection()).execute(update)
    assert (await readyz(server))[0] == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_readyz_turns_unready_while_redis_is_down(settings: Settings, database_url: str) -> None:
    """A real redis-server of the test's own, stopped and started again on its port."""
    async with private_redis() as bus:
        await bus.start()
        async with running_server(replace(settings, bus_url=bus.url)) as server:
            status, body, _ = await readyz(server)
            assert status == 200, body

            await bus.stop()
            status, body, took = await until(lambda: _unready(server), "/readyz to turn unready")
            assert status == 503 and body["failed"] == ["bus"], body
            assert body["checks"]["store"] == "ok" and body["checks"]["hosts"] == "ok"
            assert took < 1.0

            bus.launch()
            await until(lambda: _ready(server), "/readyz to be ready again")


async def _unready(server: Server) -> tuple[int, dict[str, Any], float] | None:
    answer = await readyz(server)
    return answer if answer[0] == 503 else None


async def _ready(server: Server) -> bool:
    return (await readyz(server))[0] == 200


class Forwarder:
    """A TCP forwarder to PostgreSQL on 127.0.0.1:5432 that the test can cut: a real network fault
    between the server and its store, where stopping the machine's PostgreSQL would fail the other
    tests that use it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Stops listening and drops every connection it carries."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(sink)
            sink.transport.abort()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_readyz_turns_unready_while_postgresql_is_cut_off(
    settings: Settings, database_url: str
) -> None:
    """The server reaches its PostgreSQL through a forwarder the test closes and opens again."""
    forwarder = Forwarder(free_port())
    await forwarder.open()
    url = make_url(database_url).set(host="127.0.0.1", port=forwarder.port)
    try:
        proxied = replace(settings, database_url=url.render_as_string(hide_password=False))
        async with running_server(proxied) as server:
            status, body, _ = await readyz(server)
            assert status == 200, body

            await forwarder.cut()
            status, body, took = await until(lambda: _unready(server), "/readyz to turn unready")
            assert status == 503 and "store" in body["failed"], body
            assert body["checks"]["bus"] == "ok" and body["checks"]["hosts"] == "ok"
            assert took < 1.0

            await forwarder.open()
            await until(lambda: _ready(server), "/readyz to be ready again")
    finally:
        await forwarder.cut()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_restarted_agent_is_noticed_within_two_seconds(settings: Settings, database_url: str) -> None:
    """A separate agent stopped, then started again on its address: the server marks its host back
    within 2 s of the agent's start, and reconciles (the process the agent lost is recorded ended)."""
    port = free_port()
    agent_settings = replace(settings, data_dir=settings.data_dir / "agent")
    agent: AgentHandle | None = await start_agent(f"127.0.0.1:{port}", agent_settings)
    try:
        hosted = replace(settings, hosts={"h1": f"127.0.0.1:{port}"})
        async with running_server(hosted) as server:
            key = await server.new_key("team-a")
            api = HttpClient(server.url, key)
            try:
                capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
                await start(api, capsule_id, "sleep", "1000", tag="lost")
                await until(lambda: _reachable(server, 1), "the host reachable")

                assert agent is not None
                await agent.stop()
                agent = None
                await until(lambda: _reachable(server, 0), "the host marked unreachable")
                status, body, _ = await readyz(server)
                assert status == 503 and body["failed"] == ["hosts"], body

                loop = asyncio.get_running_loop()
                agent = await start_agent(f"127.0.0.1:{port}", agent_settings)
                restarted = loop.time()
                await until(lambda: _reachable(server, 1), "the host marked back", deadline=5)
                assert loop.time() - restarted < 2.0
                ended = await wait_for_status(api, capsule_id, "lost", "EXITED")
                assert ended["signal"] == "SIGKILL"
                capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
                assert capsule["status"] == "RUNNING"  # its place on the new agent given back
                status, body, _ = await readyz(server)
                assert status == 200, body
            finally:
                await api.aclose()
    finally:
        if agent is not None:
            await agent.stop()


async def _reachable(server: Server, expected: int) -> bool:
    samples = await scrape(server)
    series = ("capsule_host_reachable", frozenset({("host", "h1")}))
    return series in samples and samples[series] == expected


async def test_runs_replaced_by_a_restart_policy_are_counted_as_restarted(
    server: Server, api: HttpClient
) -> None:
    before = await scrape(server)
    capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
    restart = {"policy": "ON_FAILURE", "maxRestarts": 2, "backoffSec": 0.01, "maxBackoffSec": 0.01}
    await start(api, capsule_id, "sh", "-c", "exit 7", tag="flaky", restart=restart)
    ended = await wait_for_status(api, capsule_id, "flaky", "EXITED")
    assert ended["restarts"] == 2 and ended["exitCode"] == 7
    after = await until(lambda: _exited_counted(server, before, "non_zero", 1), "the last run's exit counted")
    assert delta(before, after, "capsule_processes_exited_total", outcome="restarted") == 2
    assert delta(before, after, "capsule_processes_started_total") == 1


async def _exited_counted(server: Server, before: Samples, outcome: str, count: int) -> Samples | None:
    samples = await scrape(server)
    done = delta(before, samples, "capsule_processes_exited_total", outcome=outcome) == count
    return samples if done else None

"""Team isolation, for every operation document in graphql/: team B, holding team A's capsule ids,
PIDs and tags, gets NOT_FOUND (or nothing) over HTTP and both WebSocket protocols, never a byte of
A's data, and changes nothing of A's.

Every operation needs an entry in VARIABLES: a document added to graphql/ without one fails
test_every_operation_is_covered.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets
from graphql import OperationDefinitionNode, OperationType, parse
from websockets.typing import Subprotocol

from tests.e2e.client import DOCUMENTS, PROTOCOLS, HttpClient, document
from tests.e2e.conftest import Server
from tests.e2e.test_processes import start, wait_for_status

Variables = dict[str, Any]
TRANSPORTS = ("http", *PROTOCOLS)
# What team B tries to run or send, to tell its own traces from A's.
B_MARK = "b-was-here"


@dataclass(frozen=True)
class Scene:
    """Team A's capsules and processes, team B's own capsule, and what of A's must never reach B."""

    a_capsules: tuple[str, ...]  # a running one and a destroyed one
    a_selectors: tuple[str, ...]  # PIDs and tags of a running and an exited process
    a_pids: frozenset[int]
    a_tag: str
    b_capsule: str
    secrets: tuple[str, ...]  # A's tags, capsule ids, cmds, args, env values, output

    def processes(self) -> Iterator[tuple[str, str]]:
        """(capsule id, selector): A's processes in A's capsules, and A's selectors in B's own capsule."""
        for capsule_id in (*self.a_capsules, self.b_capsule):
            for selector in self.a_selectors:
                yield capsule_id, selector


def _each_capsule(build: Callable[[str], Variables]) -> Callable[[Scene], list[Variables]]:
    return lambda scene: [build(capsule_id) for capsule_id in scene.a_capsules]


def _each_process(build: Callable[[str, str], Variables]) -> Callable[[Scene], list[Variables]]:
    return lambda scene: [build(capsule_id, selector) for capsule_id, selector in scene.processes()]


def _command(scene: Scene, *, tag: bool) -> Variables:
    command: Variables = {"cmd": "echo", "args": [B_MARK], "envs": [{"name": "B", "value": B_MARK}]}
    return command | ({"tag": scene.a_tag} if tag else {})


# Each operation's variable sets, aimed at team A's things. Keyed by operation name.
VARIABLES: dict[str, Callable[[Scene], list[Variables]]] = {
    "Capsule": _each_capsule(lambda c: {"id": c}),
    "Capsules": lambda scene: [{}],
    "CreateCapsule": lambda scene: [{}],
    "DestroyCapsule": _each_capsule(lambda c: {"id": c}),
    "Exec": lambda scene: [
        {"capsuleId": c, "input": _command(scene, tag=False) | {"stdin": B_MARK}} for c in scene.a_capsules
    ],
    "StartProcess": lambda scene: [
        {"capsuleId": c, "input": _command(scene, tag=tag)} for c in scene.a_capsules for tag in (False, True)
    ],
    "Processes": lambda scene: [
        {"capsuleId": c, "status": status} for c in scene.a_capsules for status in (None, "RUNNING", "EXITED")
    ],
    "Process": _each_process(lambda c, s: {"capsuleId": c, "selector": s}),
    "WaitForProcess": _each_process(
        lambda c, s: {"capsuleId": c, "selector": s, "until": "EXITED", "timeoutSec": 1}
    ),
    "SendInput": _each_process(lambda c, s: {"capsuleId": c, "selector": s, "data": B_MARK}),
    "CloseInput": _each_process(lambda c, s: {"capsuleId": c, "selector": s}),
    "ResizeTerminal": _each_process(lambda c, s: {"capsuleId": c, "selector": s, "cols": 100, "rows": 30}),
    "SignalProcess": _each_process(lambda c, s: {"capsuleId": c, "selector": s, "signal": "SIGKILL"}),
    "StopProcess": _each_process(lambda c, s: {"capsuleId": c, "selector": s, "graceSec": 0}),
    "ProcessEvents": _each_capsule(lambda c: {"capsuleId": c}),
    "ProcessOutput": _each_process(lambda c, s: {"capsuleId": c, "selector": s, "fromSeq": 0}),
}
# Operations that act on B's own things: they succeed, and show nothing of A's.
OWN = {"Capsules", "CreateCapsule"}
# Lookups whose field is nullable: "no such thing" may be null instead of NOT_FOUND.
NULLABLE = {"Capsule", "Process"}


def operations() -> dict[str, tuple[str, OperationType]]:
    """Every operation in graphql/*.graphql: name -> (document name, query, mutation or subscription)."""
    found: dict[str, tuple[str, OperationType]] = {}
    for path in sorted(DOCUMENTS.glob("*.graphql")):
        for definition in parse(path.read_text()).definitions:
            if isinstance(definition, OperationDefinitionNode):
                assert definition.name is not None, f"{path.name} has an anonymous operation"
                found[definition.name.value] = (path.stem, definition.operation)
    return found


def test_every_operation_is_covered() -> None:
    names = set(operations())
    assert names, f"no operations found in {DOCUMENTS}"
    assert names - set(VARIABLES) == set(), "give each new operation its variables in VARIABLES"
    assert set(VARIABLES) - names == set(), "VARIABLES names operations that no longer exist"


@dataclass
class Answer:
    """What came back for one operation: every frame as sent, and the results in them."""

    frames: list[str]
    results: list[dict[str, Any]]  # {"data": ..., "errors": [...]}


class Socket:
    """One authenticated WebSocket of one protocol that runs operations and keeps every frame."""

    def __init__(self, ws: websockets.ClientConnection, protocol: str) -> None:
        self._ws, self._protocol, self._count = ws, protocol, 0
        self.frames: list[str] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, key: str, protocol: str) -> AsyncIterator[Socket]:
        async with websockets.connect(url, subprotocols=[Subprotocol(protocol)]) as ws:
            socket = cls(ws, protocol)
            await ws.send(
                json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}})
            )
            async with asyncio.timeout(10):
                while (await socket._receive())["type"] != "connection_ack":
                    pass
            yield socket

    async def _receive(self) -> dict[str, Any]:
        frame = await self._ws.recv()
        assert isinstance(frame, str)
        self.frames.append(frame)
        message: dict[str, Any] = json.loads(frame)
        return message

    async def run(self, query: str, variables: Variables) -> Answer:
        self._count += 1
        operation_id = str(self._count)
        kind = "subscribe" if self._protocol == "graphql-transport-ws" else "start"
        await self._ws.send(
            json.dumps(
                {"id": operation_id, "type": kind, "payload": {"query": query, "variables": variables}}
            )
        )
        answer = Answer(frames=[], results=[])
        async with asyncio.timeout(15):  # a stream of another team's capsule would run on: a failure
            while True:
                message = await self._receive()
                if message.get("id") != operation_id:
                    continue  # keep-alives, and a complete of an operation already answered
                answer.frames.append(self.frames[-1])
                if message["type"] in ("next", "data"):
                    answer.results.append(message["payload"])
                elif message["type"] == "error":
                    errors = message["payload"]
                    answer.results.append(
                        {"data": None, "errors": errors if isinstance(errors, list) else [errors]}
                    )
                    return answer
                elif message["type"] == "complete":
                    return answer


async def run_http(http: httpx.AsyncClient, url: str, query: str, variables: Variables) -> Answer:
    response = await http.post(url, json={"query": query, "variables": variables})
    return Answer(frames=[response.text], results=[response.json()])


def _leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(field name, scalar) of every scalar in a JSON value; error locations left out."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name != "locations":
                yield from _leaves(item, name)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item, key)
    else:
        yield key, value


def assert_nothing_of_a(scene: Scene, variables: Variables, answer: Answer) -> None:
    """No secret of A's in any frame but what B itself sent; no A PID in any field B did not send."""
    sent = {str(value) for _, value in _leaves(variables)}
    text = "\n".join(answer.frames)
    for secret in scene.secrets:
        if secret not in sent:
            assert secret not in text, f"{secret!r} of team A reached team B: {text[:2000]}"
    for name, value in _leaves([r.get("data") for r in answer.results]):
        assert not (name == "pid" and value in scene.a_pids), f"team A's PID {value} reached team B"
    for result in answer.results:
        for name, value in _leaves(result.get("errors") or []):
            if str(value) in {str(pid) for pid in scene.a_pids}:
                assert str(value) in sent, f"team A's PID {value} in an error field {name!r}"


def assert_refused(name: str, kind: OperationType, transport: str, answer: Answer) -> None:
    """NOT_FOUND with no data, or for a nullable lookup null; a subscription over HTTP is refused."""
    assert answer.results, f"{name}: no answer at all"
    codes = [e.get("extensions", {}).get("code") for r in answer.results for e in r.get("errors") or []]
    data = [r.get("data") for r in answer.results]
    if kind is OperationType.SUBSCRIPTION and transport == "http":
        assert codes == ["INVALID_REQUEST"], f"{name} over HTTP: {answer.results}"
        return
    if name in NULLABLE and not codes:
        assert all(value is None for d in data for value in (d or {}).values()), f"{name}: {data}"
        return
    assert codes and set(codes) == {"NOT_FOUND"}, f"{name} over {transport}: {answer.results}"
    assert all(value is None for d in data for value in (d or {}).values()), f"{name}: {data}"


def assert_own(name: str, scene: Scene, answer: Answer, b_capsules: set[str]) -> None:
    """B's own capsules and only those: listed, all of them; created, a new one."""
    [result] = answer.results
    assert not result.get("errors"), f"{name}: {result}"
    ids = {value for field, value in _leaves(result["data"]) if field == "id"}
    assert not ids & set(scene.a_capsules), f"{name} showed team A's capsules: {ids}"
    if name == "Capsules":
        assert ids == b_capsules
    else:
        b_capsules.update(ids)


@dataclass
class TeamA:
    api: HttpClient
    scene: Scene
    reader: dict[str, Any]
    output: str


@pytest.fixture
async def team_a(server: Server) -> AsyncIterator[TeamA]:
    """Team A's world: a running capsule with a reader of stdin and an exited process, a destroyed
    capsule, and unique markers in every field of them. Team B gets a capsule of its own."""
    mark = uuid.uuid4().hex[:12]
    api = HttpClient(server.url, await server.new_key("team-a"))
    try:
        capsule = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
        destroyed = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
        output, script = f"a-output-{mark}", f"echo a-output-{mark}; exec cat"
        env = {"name": "A_SECRET", "value": f"a-env-{mark}"}
        reader = await start(
            api, capsule, "sh", "-c", script, f"a-arg-{mark}", tag=f"a-reader-{mark}", stdin=True, envs=[env]
        )
        done = await start(api, capsule, "sh", "-c", f"echo a-done-{mark}", tag=f"a-done-{mark}")
        await wait_for_status(api, capsule, done["tag"], "EXITED")
        (await api.run("DestroyCapsule", id=destroyed)).ok()
        scene = Scene(
            a_capsules=(capsule, destroyed),
            a_selectors=(str(reader["pid"]), reader["tag"], str(done["pid"]), done["tag"]),
            a_pids=frozenset({reader["pid"], done["pid"]}),
            a_tag=reader["tag"],
            b_capsule="",
            secrets=(
                capsule,
                destroyed,
                reader["tag"],
                done["tag"],
                output,
                script,
                f"a-arg-{mark}",
                env["value"],
                f"a-done-{mark}",
            ),
        )
        yield TeamA(api=api, scene=scene, reader=reader, output=output + "\n")
    finally:
        await api.aclose()


async def a_world(api: HttpClient, scene: Scene) -> list[Any]:
    """What team A sees of its capsules and processes, to compare before and after B's attempts."""
    seen = []
    for capsule_id in scene.a_capsules:
        capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
        processes = (await api.run("Processes", capsuleId=capsule_id)).ok()["processes"]
        seen.append((capsule["status"], sorted((p["pid"], p["tag"], p["status"]) for p in processes)))
    return seen


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_team_b_reaches_nothing_of_team_a(server: Server, team_a: TeamA, transport: str) -> None:
    b_key = await server.new_key("team-b")
    b_api = HttpClient(server.url, b_key)
    b_capsule = (await b_api.run("CreateCapsule")).ok()["createCapsule"]["id"]
    scene = Scene(**{**team_a.scene.__dict__, "b_capsule": b_capsule})
    before = await a_world(team_a.api, scene)
    b_capsules = {b_capsule}
    try:
        async with _runner(server, b_key, transport, b_api.http) as run:
            for name, (doc, kind) in operations().items():
                for variables in VARIABLES[name](scene):
                    answer = await run(document(doc), variables)
                    assert_nothing_of_a(scene, variables, answer)
                    if name in OWN:
                        assert_own(name, scene, answer, b_capsules)
                    else:
                        assert_refused(name, kind, transport, answer)
    finally:
        await b_api.aclose()

    # A's world is as it was: no capsule stopped, no process started, signalled or cut off from stdin.
    assert await a_world(team_a.api, scene) == before
    capsule, reader = scene.a_capsules[0], team_a.reader["tag"]
    (await team_a.api.run("SendInput", capsuleId=capsule, selector=reader, data="a-end\n")).ok()
    (await team_a.api.run("CloseInput", capsuleId=capsule, selector=reader)).ok()
    exited = await wait_for_status(team_a.api, capsule, reader, "EXITED")
    assert exited["exitCode"] == 0
    assert await _output(server, team_a, capsule, reader) == team_a.output + "a-end\n"


@asynccontextmanager
async def _runner(
    server: Server, key: str, transport: str, http: httpx.AsyncClient
) -> AsyncIterator[Callable[[str, Variables], Any]]:
    if transport == "http":
        yield lambda query, variables: run_http(http, server.url, query, variables)
        return
    async with Socket.open(server.ws_url, key, transport) as socket:
        yield socket.run


async def _output(server: Server, team_a: TeamA, capsule_id: str, selector: str) -> str:
    key = team_a.api.http.headers["authorization"].removeprefix("Bearer ")
    async with Socket.open(server.ws_url, key, "graphql-transport-ws") as socket:
        answer = await socket.run(document("ProcessOutput"), {"capsuleId": capsule_id, "selector": selector})
    chunks = [r["data"]["processOutput"] for r in answer.results]
    return "".join(c["data"] for c in chunks if c["__typename"] == "OutputChunk")

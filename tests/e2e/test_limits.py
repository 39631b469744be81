"""The size limits against a real uvicorn: bodies (413), WebSocket messages (1009), each input field,
the document's depth with introspection counted, and an INTERNAL error's errorId."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import websockets
from graphql import get_introspection_query
from sqlalchemy import text
from websockets.typing import Subprotocol

from app.config import Settings
from app.domain import InputLimits
from tests.e2e.client import PROTOCOLS, HttpClient, document
from tests.e2e.conftest import Server, running_server

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
MiB = 1024 * 1024
LIMIT = InputLimits()  # the defaults, which the servers here keep but for input_bytes
INPUT_BYTES = 1000
JSON = {"Content-Type": "application/json"}


def _refusal(response: httpx.Response) -> str:
    """The message of a 413, checked to be a GraphQL error with INVALID_REQUEST."""
    assert response.status_code == 413, response.text
    [error] = response.json()["errors"]
    assert error["extensions"] == {"code": "INVALID_REQUEST"}
    return str(error["message"])


async def _raw_request(url: str, head: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """Sends a request head and part of a body on a socket of its own; the status and JSON answer."""
    parts = urlparse(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        async with asyncio.timeout(10):
            response = await reader.read()  # the server closes once it has answered
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@SQLITE
class TestBody:
    async def test_a_declared_length_past_the_limit_is_refused_before_the_body_is_read(
        self, server: Server, key: str
    ) -> None:
        # 32 MiB announced, 1 KiB sent: the answer comes from the head alone.
        path = urlparse(server.url).path
        head = (
            f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {32 * MiB}\r\n\r\n"
        )
        status, answer = await _raw_request(server.url, head, b"{" + b" " * 1023)
        assert status == 413
        assert answer == {
            "errors": [
                {
                    "message": f"the request body has {32 * MiB} bytes; at most {MiB} are allowed",
                    "extensions": {"code": "INVALID_REQUEST"},
                }
            ]
        }

    async def test_a_chunked_body_past_the_limit_is_refused_as_it_arrives(
        self, server: Server, key: str
    ) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"query": "{ __typename }", "padding": "'
            for _ in range(24):  # 1.5 MiB
                yield b" " * 65536
            yield b'"}'

        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            response = await http.post(server.url, content=chunks(), headers=JSON)
        assert "content-length" not in response.request.headers  # sent chunked
        assert _refusal(response) == f"the request body is over {MiB} bytes, the most allowed"

    async def test_a_body_a_little_past_the_limit_gets_its_413(self, server: Server, key: str) -> None:
        body = json.dumps({"query": "{ __typename }", "padding": " " * MiB}).encode()
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            response = await http.post(server.url, content=body, headers=JSON)
        assert _refusal(response) == f"the request body has {len(body)} bytes; at most {MiB} are allowed"

    async def test_a_body_within_the_limit_is_served(self, api: HttpClient) -> None:
        padding = " " * (MiB - 100)
        answer = await api.query("{ __typename }" + padding)
        assert answer.ok() == {"__typename": "Query"}


@SQLITE
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_websocket_message_past_the_limit_closes_with_1009(
    server: Server, key: str, capsule_id: str, protocol: str
) -> None:
    async with websockets.connect(server.ws_url, subprotocols=[Subprotocol(protocol)]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}))
        async with asyncio.timeout(10):
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            payload = {
                "query": document("Exec"),
                "variables": {"capsuleId": capsule_id, "input": {"cmd": "cat", "stdin": "x" * MiB}},
            }
            kind = "subscribe" if protocol == "graphql-transport-ws" else "start"
            message = json.dumps({"type": kind, "id": "1", "payload": payload})
            await ws.send(message)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    assert json.loads(await ws.recv())["type"] == "ka"
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    assert closed.value.rcvd.reason == f"a message has {len(message)} bytes; at most {MiB} are allowed"


def _exec(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "Exec", {"input": {"cmd": "true", **fields}}


def _start(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "StartProcess", {"input": {"cmd": "true", **fields}}


# Each input limit, one past it, and the words that say so.
INPUT_CASES: list[tuple[str, tuple[str, dict[str, Any]], str]] = [
    (
        "cmd",
        _exec(cmd="x" * 5000),
        f"cmd has 5000 bytes; at most {LIMIT.cmd_bytes} are allowed",
    ),
    (
        "args count",
        _exec(args=[""] * 200_000),
        f"args has 200000 items; at most {LIMIT.args} are allowed",
    ),
    (
        "arg length, in UTF-8 bytes",
        _start(args=["ok", "é" * 70_000]),
        f"args[1] has 140000 bytes; at most {LIMIT.arg_bytes} are allowed",
    ),
    (
        "envs count",
        _exec(envs=[{"name": f"V{i}", "value": ""} for i in range(2000)]),
        f"envs has 2000 items; at most {LIMIT.envs} are allowed",
    ),
    (
        "env name",
        _exec(envs=[{"name": "N" * 100_000, "value": "x"}]),
        f"envs[0].name has 100000 bytes; at most {LIMIT.env_name_bytes} are allowed",
    ),
    (
        "env value",
        _start(envs=[{"name": "A", "value": "x"}, {"name": "B", "value": "v" * 200_000}]),
        f"envs[1].value (of B) has 200000 bytes; at most {LIMIT.env_value_bytes} are allowed",
    ),
    (
        "cwd",
        _exec(cwd="d/" * 2500),
        f"cwd has 5000 bytes; at most {LIMIT.cwd_bytes} are allowed",
    ),
    (
        "tag",
        _start(tag="t" * 100),
        "tag has 100 characters; at most 64 are allowed",
    ),
    (
        "exec stdin",
        _exec(stdin="s" * (INPUT_BYTES + 1)),
        f"stdin has {INPUT_BYTES + 1} bytes; at most {INPUT_BYTES} are allowed",
    ),
    (
        "sendInput data",
        ("SendInput", {"selector": "reader", "data": "d" * (INPUT_BYTES + 1)}),
        f"data has {INPUT_BYTES + 1} bytes; at most {INPUT_BYTES} are allowed",
    ),
]


@SQLITE
async def test_each_input_limit_is_invalid_request_naming_the_limit_and_the_size(settings: Settings) -> None:
    limited = replace(settings, input_limits=replace(InputLimits(), input_bytes=INPUT_BYTES))
    async with running_server(limited) as server:
        api = HttpClient(server.url, await server.new_key("team-a"))
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            reader = {"cmd": "cat", "tag": "reader", "stdin": True}
            (await api.run("StartProcess", capsuleId=capsule_id, input=reader)).ok()
            for name, (operation, variables), words in INPUT_CASES:
                answer = await api.run(operation, capsuleId=capsule_id, **variables)
                assert answer.codes == ["INVALID_REQUEST"], (name, answer.errors)
                assert answer.errors[0]["message"] == words, name
            # At each limit, exactly: served.
            longest = "x" + "é" * (LIMIT.arg_bytes // 2)  # 2 bytes each in UTF-8
            at_limits = {"cmd": "sh", "args": ["-c", 'printf %s "$1" | wc -c', "sh", longest]}
            ran = (await api.run("Exec", capsuleId=capsule_id, input=at_limits)).ok()["exec"]
            assert (ran["exitCode"], ran["stdout"].strip()) == (0, str(LIMIT.arg_bytes))
            sent = await api.run("SendInput", capsuleId=capsule_id, selector="reader", data="d" * INPUT_BYTES)
            assert sent.ok()["sendInput"] is True
        finally:
            await api.aclose()


def _nested(depth: int) -> str:
    """An introspection query depth fields deep: __schema, types, fields, type, then ofType."""
    assert depth >= 5
    inner = "name"
    for _ in range(depth - 5):
        inner = f"ofType {{ {inner} }}"
    return f"{{ __schema {{ types {{ fields {{ type {{ {inner} }} }} }} }} }}"


@SQLITE
async def test_the_depth_limit_counts_introspection(api: HttpClient) -> None:
    graphiql = get_introspection_query(descriptions=True)  # what GraphiQL and gql send
    assert (await api.query(graphiql)).ok()["__schema"]["queryType"]["name"] == "Query"
    assert (await api.query(_nested(15))).ok()["__schema"]["types"]
    for depth in (16, 40):
        answer = await api.query(_nested(depth))
        assert answer.codes == ["INVALID_REQUEST"]
        assert answer.errors[0]["message"] == (
            f"the operation is {depth} fields deep; at most 15 are allowed (introspection fields count too)"
        )
    # __type's fields nest without end; graphql-core's own rule refuses this one too.
    cycle = "fields { type { " * 10 + "name" + " } }" * 10
    answer = await api.query(f'query Deep {{ __type(name: "Capsule") {{ {cycle} }} }}')
    assert set(answer.codes) == {"INVALID_REQUEST"}
    assert answer.errors[0]["message"].startswith("operation 'Deep' is 22 fields deep; at most 15")


@SQLITE
async def test_fragments_spread_twice_at_each_level_are_measured_once(api: HttpClient) -> None:
    # 40 fragments, each spreading the next twice: 2^40 fields once expanded, which a walk that
    # expands each spread never finishes; measured once per fragment, they are refused at once.
    levels = 40
    fragments = "".join(f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}\n" for i in range(levels))
    aliased = f"query {{ ...F0 }}\n{fragments}fragment F{levels} on Query {{ a: __typename }}"
    answer = await api.query(aliased)
    assert answer.codes == ["INVALID_REQUEST"]
    assert answer.errors[0]["message"] == (
        "the operation has over 10^9 aliased fields (fragments expanded); at most 50 are allowed"
    )
    plain = f"query {{ ...F0 }}\n{fragments}fragment F{levels} on Query {{ __typename }}"
    assert (await api.query(plain)).ok() == {"__typename": "Query"}
    unknown = await api.query("{ ...Nowhere }")  # once an INTERNAL error (a KeyError) in the depth limiter
    assert unknown.codes == ["INVALID_REQUEST"]
    assert unknown.errors[0]["message"] == "Unknown fragment 'Nowhere'."


# A replica on a database that lacks a table it needs (a migration not applied, or a schema changed
# under it) fails for real: PostgreSQL answers "relation does not exist", which no rule foresees.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_internal_error_carries_an_error_id_the_log_has_beside_its_traceback(
    server: Server, api: HttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    engine = server.state.platform.db.engine
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE capsule RENAME TO capsule_moved"))
    try:
        with caplog.at_level(logging.ERROR, logger="app.api.errors"):
            response = await api.http.post(api.url, json={"query": document("Capsules")})
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE capsule_moved RENAME TO capsule"))
    assert response.status_code == 200
    [error] = response.json()["errors"]
    assert error["message"] == "internal error: it has been logged; retry, and report it if it persists"
    assert error["extensions"].keys() == {"code", "errorId"} and error["extensions"]["code"] == "INTERNAL"
    error_id = error["extensions"]["errorId"]
    assert re.fullmatch(r"[0-9a-f]{16}", error_id)
    for leak in ("Traceback", "capsule_moved", "relation", "sqlalchemy", "asyncpg", 'File "'):
        assert leak not in response.text
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.getMessage() == f"internal error {error_id} at capsules"
    logged = logging.Formatter().format(record)
    assert "Traceback (most recent call last)" in logged and 'relation "capsule" does not exist' in logged
    assert (await api.run("Capsules")).ok() == {"capsules": []}  # the table back, all is served again

"""Each error code caused for real, over HTTP and both WebSocket protocols."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import websockets
from gql.transport.exceptions import TransportError, TransportQueryError
from websockets.typing import Subprotocol

from app.agent.leftovers import Sessions
from app.config import Settings
from tests.e2e.client import PROTOCOLS, Answer, HttpClient, document, subscribe, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start
from tests.system import free_port


class TestUnauthenticated:
    @pytest.mark.parametrize("key", [None, "cap_wrong", "not-even-a-key"])
    async def test_http(self, server: Server, key: str | None) -> None:
        client = HttpClient(server.url, key)
        try:
            answer = await client.run("Capsules")
        finally:
            await client.aclose()
        assert answer.codes == ["UNAUTHENTICATED"]
        assert "Authorization: Bearer" in answer.errors[0]["message"]

    @pytest.mark.parametrize("protocol", PROTOCOLS)
    @pytest.mark.parametrize(
        ("payload", "reason"),
        [
            ({}, 'no API key: send {"Authorization": "Bearer <key>"} as the connection_init payload'),
            (
                {"Authorization": "cap_no_scheme"},
                "the Authorization value in connection_init is not 'Bearer <key>'",
            ),
            (
                {"authorization": "Bearer cap_wrong"},
                "the API key in connection_init is wrong or revoked: "
                "make a new one with `capsule keys create`",
            ),
        ],
        ids=["missing", "not-bearer", "wrong"],
    )
    async def test_websocket_closes_with_4403_and_says_why(
        self, server: Server, protocol: str, payload: dict[str, str], reason: str
    ) -> None:
        async with websockets.connect(server.ws_url, subprotocols=[Subprotocol(protocol)]) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
            async with asyncio.timeout(5):
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        message = json.loads(await ws.recv())
                        assert message["type"] in ("connection_error", "ka")
                        if message["type"] == "connection_error":
                            assert message["payload"]["message"] == reason
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, reason)

    @pytest.mark.parametrize("protocol", PROTOCOLS)
    async def test_a_wrong_key_in_the_upgrade_header_says_where_it_was(
        self, server: Server, protocol: str
    ) -> None:
        headers = {"Authorization": "Bearer cap_wrong"}
        async with websockets.connect(
            server.ws_url, subprotocols=[Subprotocol(protocol)], additional_headers=headers
        ) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
            async with asyncio.timeout(5):
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.reason.startswith("the API key in the upgrade request's header is wrong")

    @pytest.mark.parametrize("protocol", PROTOCOLS)
    async def test_gql_reports_the_reason(self, server: Server, protocol: str) -> None:
        with pytest.raises(TransportError) as raised:
            async with ws_session(server.ws_url, "cap_wrong", protocol) as session:
                async for _ in subscribe(session, "ProcessEvents", capsuleId="cap-x"):
                    pass
        # graphql-ws carries the reason in connection_error; graphql-transport-ws in the close frame,
        # which gql keeps as the cause of its "connection failed".
        cause = raised.value.__cause__
        told = str(raised.value) if cause is None else str(getattr(cause, "rcvd", None))
        assert "the API key in connection_init is wrong or revoked" in told

    @pytest.mark.parametrize("protocol", PROTOCOLS)
    async def test_websocket_key_in_upgrade_header(self, server: Server, key: str, protocol: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with websockets.connect(
            server.ws_url, subprotocols=[Subprotocol(protocol)], additional_headers=headers
        ) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
            async with asyncio.timeout(5):
                assert json.loads(await ws.recv())["type"] == "connection_ack"


async def test_other_teams_capsule_is_not_found(server: Server, api: HttpClient, capsule_id: str) -> None:
    other = HttpClient(server.url, await server.new_key("team-b"))
    try:
        assert (await other.run("Capsule", id=capsule_id)).ok()["capsule"] is None
        assert (await other.run("Capsules")).ok()["capsules"] == []
        answer = await other.run("StartProcess", capsuleId=capsule_id, input={"cmd": "true"})
        assert answer.codes == ["NOT_FOUND"]
        unknown = await other.run("StartProcess", capsuleId="cap-0000000000000000", input={"cmd": "true"})
        # Another team's capsule and a capsule that does not exist read the same.
        assert answer.errors[0]["message"].replace(capsule_id, "X") == unknown.errors[0]["message"].replace(
            "cap-0000000000000000", "X"
        )
        destroyed = await other.run("DestroyCapsule", id=capsule_id)
        assert destroyed.codes == ["NOT_FOUND"]
    finally:
        await other.aclose()


async def test_duplicate_tag_is_conflict(api: HttpClient, capsule_id: str) -> None:
    await start(api, capsule_id, "sleep", "1000", tag="web")
    answer = await api.run(
        "StartProcess", capsuleId=capsule_id, input={"cmd": "sleep", "args": ["1"], "tag": "web"}
    )
    assert answer.codes == ["CONFLICT"]
    assert "web" in answer.errors[0]["message"]


async def test_stopped_capsule_is_invalid_state(api: HttpClient, capsule_id: str) -> None:
    await start(api, capsule_id, "sleep", "1000", tag="doomed")
    destroyed = (await api.run("DestroyCapsule", id=capsule_id)).ok()["destroyCapsule"]
    assert destroyed["status"] == "STOPPED"
    answer = await api.run("StartProcess", capsuleId=capsule_id, input={"cmd": "true"})
    assert answer.codes == ["INVALID_STATE"]
    assert "STOPPED" in answer.errors[0]["message"]
    # The records outlive the capsule.
    ended = (await api.run("Processes", capsuleId=capsule_id, status="EXITED")).ok()["processes"]
    assert [p["tag"] for p in ended] == ["doomed"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"cmd": ""}, "cmd is empty"),
        ({"cmd": "true", "tag": "123"}, "all digits"),
        ({"cmd": "true", "tag": "bad tag!"}, "malformed"),
        ({"cmd": "true", "timeoutSec": -1}, "negative"),
        ({"cmd": "no-such-program-here"}, "no-such-program-here"),
        ({"cmd": "true", "cwd": "../../.."}, "cwd"),
        ({"cmd": "true", "cwd": "x" * 300}, "File name too long"),
    ],
)
async def test_bad_start_input_is_invalid_request(
    api: HttpClient, capsule_id: str, fields: dict[str, object], words: str
) -> None:
    answer = await api.run("StartProcess", capsuleId=capsule_id, input=fields)
    assert answer.codes == ["INVALID_REQUEST"]
    assert words in answer.errors[0]["message"]


async def test_malformed_documents_are_invalid_request(api: HttpClient) -> None:
    assert (await api.query("query { capsules { ")).codes == ["INVALID_REQUEST"]
    assert (await api.query("query { capsules { nope } }")).codes == ["INVALID_REQUEST"]
    answer = await api.query("mutation($id: ID!) { destroyCapsule(id: $id) { id } }", id=None)
    assert answer.codes == ["INVALID_REQUEST"]


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """`capsule agent --listen` as its own OS process, to be killed for real."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = os.environ | {"CAPSULE_DATA_DIR": str(tmp_path / "agent-data")}
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", "agent", "--listen", address], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent did not listen in time"
            await asyncio.sleep(0.05)
        yield process, address
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # An agent killed outright leaves its processes; end them as the next agent would.
        for sessions in (tmp_path / "agent-data").glob("agent/capsules/*/sessions"):
            Sessions(sessions).sweep()


async def test_killed_agent_is_host_unavailable(
    settings: Settings, agent_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, address = agent_process
    async with running_server(replace(settings, hosts={"h1": address})) as server:
        client = HttpClient(server.url, await server.new_key("team-a"))
        try:
            capsule = (await client.run("CreateCapsule")).ok()["createCapsule"]
            assert capsule["hostId"] == "h1"
            ok = await client.run("Exec", capsuleId=capsule["id"], input={"cmd": "echo", "args": ["hi"]})
            assert ok.ok()["exec"]["stdout"] == "hi\n"
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            began = time.monotonic()
            answer = await client.run("Exec", capsuleId=capsule["id"], input={"cmd": "echo"})
            assert answer.codes == ["HOST_UNAVAILABLE"]
            assert time.monotonic() - began < 2.5
            listed = await client.run("Processes", capsuleId=capsule["id"])
            assert listed.codes == ["HOST_UNAVAILABLE"]
        finally:
            await client.aclose()


async def test_oversized_documents_are_refused(api: HttpClient) -> None:
    aliases = " ".join(f"a{i}: capsules {{ id }}" for i in range(60))
    assert (await api.query(f"query {{ {aliases} }}")).codes == ["INVALID_REQUEST"]
    answer = await api.query("query { capsules { id " + "__typename " * 6000 + "} }")
    assert answer.codes == ["INVALID_REQUEST"]


async def test_graphiql_introspection_passes_the_limits(api: HttpClient) -> None:
    from graphql import get_introspection_query

    answer = await api.query(get_introspection_query(descriptions=True))
    assert answer.ok()["__schema"]["queryType"]["name"] == "Query"


async def test_limits_are_rate_limited(settings: Settings) -> None:
    limited = replace(settings, max_capsules_per_team=1, max_processes_per_capsule=2)
    async with running_server(limited) as server:
        client = HttpClient(server.url, await server.new_key("team-a"))
        try:
            capsule_id = (await client.run("CreateCapsule")).ok()["createCapsule"]["id"]
            second = await client.run("CreateCapsule")
            assert second.codes == ["RATE_LIMITED"] and "destroy one" in second.errors[0]["message"]
            for _ in range(2):
                await start(client, capsule_id, "sleep", "1000")
            third = await client.run("StartProcess", capsuleId=capsule_id, input={"cmd": "true"})
            assert third.codes == ["RATE_LIMITED"] and "stop one" in third.errors[0]["message"]
            # Another team has limits of its own.
            other = HttpClient(server.url, await server.new_key("team-b"))
            try:
                (await other.run("CreateCapsule")).ok()
            finally:
                await other.aclose()
            (await client.run("DestroyCapsule", id=capsule_id)).ok()
            (await client.run("CreateCapsule")).ok()
        finally:
            await client.aclose()


async def test_a_subscription_over_http_points_to_the_websocket(api: HttpClient, capsule_id: str) -> None:
    answer = await api.run("ProcessEvents", capsuleId=capsule_id)
    assert answer.codes == ["INVALID_REQUEST"]
    assert "WebSocket" in answer.errors[0]["message"]
    got = await api.http.get(
        api.url, params={"query": 'subscription { processEvents(capsuleId: "x") { kind } }'}
    )
    assert got.json()["errors"][0]["extensions"]["code"] == "INVALID_REQUEST"


HUGE_PID = "99999999999999999999"


def assert_no_such_pid(error: dict[str, Any], selector: str) -> None:
    assert error["extensions"]["code"] == "NOT_FOUND"
    assert error["message"].startswith(f"no process {selector[:40]}")
    assert "a PID is at most 4194304" in error["message"]


class TestPidBeyondAnyProcess:
    """A PID larger than any the kernel hands out names no process: NOT_FOUND, never INTERNAL."""

    # Past SQLite's INTEGER, past PostgreSQL's int4, just past pid_max, past int()'s digit limit.
    @pytest.mark.parametrize("selector", [HUGE_PID, "2147483648", "4194305", "9" * 5000])
    async def test_process_is_not_found(self, api: HttpClient, capsule_id: str, selector: str) -> None:
        await start(api, capsule_id, "sleep", "1000", tag="other")
        answer = await api.run("Process", capsuleId=capsule_id, selector=selector)
        assert answer.data == {"process": None}
        assert_no_such_pid(answer.errors[0], selector)

    @pytest.mark.parametrize("selector", ["4194304", "0", "0004194304"])
    async def test_a_pid_within_range_that_names_nothing_is_null(
        self, api: HttpClient, capsule_id: str, selector: str
    ) -> None:
        assert (await api.run("Process", capsuleId=capsule_id, selector=selector)).ok()["process"] is None

    @pytest.mark.parametrize(
        ("operation", "variables"),
        [
            ("SignalProcess", {"signal": "SIGTERM"}),
            ("StopProcess", {"graceSec": 0}),
            ("SendInput", {"data": "hi"}),
            ("CloseInput", {}),
        ],
    )
    async def test_mutations_are_not_found(
        self, api: HttpClient, capsule_id: str, operation: str, variables: dict[str, object]
    ) -> None:
        answer = await api.run(operation, capsuleId=capsule_id, selector=HUGE_PID, **variables)
        assert_no_such_pid(answer.errors[0], HUGE_PID)

    async def test_output_is_not_found(self, server: Server, key: str, capsule_id: str) -> None:
        async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
            with pytest.raises(TransportQueryError) as raised:
                async with asyncio.timeout(10):
                    async for _ in subscribe(
                        session, "ProcessOutput", capsuleId=capsule_id, selector=HUGE_PID
                    ):
                        pass
        assert raised.value.errors is not None
        assert_no_such_pid(raised.value.errors[0], HUGE_PID)

    async def test_processes_list_is_unaffected(self, api: HttpClient, capsule_id: str) -> None:
        await start(api, capsule_id, "sleep", "1000", tag="listed")
        assert (await api.run("Process", capsuleId=capsule_id, selector=HUGE_PID)).codes == ["NOT_FOUND"]
        listed = (await api.run("Processes", capsuleId=capsule_id)).ok()["processes"]
        assert [p["tag"] for p in listed] == ["listed"]


@pytest.mark.parametrize("selector", ["\0", "web\0", "bad tag!", "-1"])
async def test_a_selector_that_is_neither_pid_nor_tag_is_invalid_request(
    api: HttpClient, capsule_id: str, selector: str
) -> None:
    # A NUL reached PostgreSQL's lookup by tag, which refused it: INTERNAL.
    answer = await api.run("Process", capsuleId=capsule_id, selector=selector)
    assert answer.codes == ["INVALID_REQUEST"]
    assert "neither a PID (digits only) nor a tag" in answer.errors[0]["message"]
    signalled = await api.run("SignalProcess", capsuleId=capsule_id, selector=selector)
    assert signalled.codes == ["INVALID_REQUEST"]


async def post_escaped(api: HttpClient, operation: str, **variables: Any) -> Answer:
    """Posts a document with its variables as ASCII JSON: a lone surrogate travels as its \\u escape,
    which JSON allows and no UTF-8 encoder can produce."""
    body = json.dumps({"query": document(operation), "variables": variables})
    response = await api.http.post(api.url, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return Answer(data=response.json().get("data"), errors=response.json().get("errors") or [])


@pytest.mark.parametrize(
    ("operation", "variables"),
    [
        ("StartProcess", {"input": {"cmd": "\ud800"}}),
        ("StartProcess", {"input": {"cmd": "echo", "args": ["ok", "x\udfff"]}}),
        ("StartProcess", {"input": {"cmd": "true", "cwd": "\ud800dir"}}),
        ("StartProcess", {"input": {"cmd": "true", "envs": [{"name": "A", "value": "\ud800"}]}}),
        ("Exec", {"input": {"cmd": "cat", "stdin": "\ud800"}}),
        ("Exec", {"input": {"cmd": "\udbff"}}),
    ],
    ids=["cmd", "args", "cwd", "env", "exec-stdin", "exec-cmd"],
)
async def test_text_that_is_not_unicode_is_invalid_request(
    api: HttpClient, capsule_id: str, operation: str, variables: dict[str, Any]
) -> None:
    answer = await post_escaped(api, operation, capsuleId=capsule_id, **variables)
    assert answer.codes == ["INVALID_REQUEST"]
    assert "lone UTF-16 surrogate" in answer.errors[0]["message"]
    listed = await api.run("Processes", capsuleId=capsule_id)
    assert listed.ok()["processes"] == []  # nothing started, nothing recorded


async def test_input_that_is_not_unicode_is_invalid_request(api: HttpClient, capsule_id: str) -> None:
    await start(api, capsule_id, "cat", tag="reader", stdin=True)
    answer = await post_escaped(api, "SendInput", capsuleId=capsule_id, selector="reader", data="\ud800")
    assert answer.codes == ["INVALID_REQUEST"]

"""The life of a background process through the API: start, list, get, signal, stop, input, events."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import pytest
from gql.transport.exceptions import TransportQueryError

from app.config import Settings
from tests.agent.helpers import eventually
from tests.e2e.client import PROTOCOLS, HttpClient, live_events, subscribe, ws_session
from tests.e2e.conftest import Server, running_server


async def start(api: HttpClient, capsule_id: str, cmd: str, *args: str, **fields: Any) -> dict[str, Any]:
    answer = await api.run(
        "StartProcess", capsuleId=capsule_id, input={"cmd": cmd, "args": list(args), **fields}
    )
    return dict(answer.ok()["startProcess"])


async def until_file(api: HttpClient, capsule_id: str, name: str) -> None:
    """Waits until the capsule's workspace holds the file (a script's way to say its traps are set)."""
    async with asyncio.timeout(10):
        while True:
            answer = await api.run("Exec", capsuleId=capsule_id, input={"cmd": "test", "args": ["-f", name]})
            if answer.ok()["exec"]["exitCode"] == 0:
                return
            await asyncio.sleep(0.05)


async def wait_for_status(api: HttpClient, capsule_id: str, selector: str, status: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            process = (await api.run("Process", capsuleId=capsule_id, selector=selector)).ok()["process"]
            if process and process["status"] == status:
                return dict(process)
            await asyncio.sleep(0.05)


async def collect_output(server: Server, key: str, capsule_id: str, selector: str) -> str:
    text = ""
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        async with asyncio.timeout(10):
            async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector=selector):
                event = result["processOutput"]
                if event["__typename"] == "OutputChunk":
                    text += event["data"]
    return text


class TestProcessLife:
    async def test_start_list_output_signal_by_tag(
        self, server: Server, key: str, api: HttpClient, capsule_id: str
    ) -> None:
        started = await start(api, capsule_id, "sh", "-c", "echo ready; exec sleep 1000", tag="sleeper")
        assert started["tag"] == "sleeper" and started["status"] == "RUNNING" and started["pid"] > 0
        assert started["cmd"] == "sh" and started["args"] == ["-c", "echo ready; exec sleep 1000"]

        listed = (await api.run("Processes", capsuleId=capsule_id)).ok()["processes"]
        assert [p["tag"] for p in listed] == ["sleeper"]
        by_pid = (await api.run("Process", capsuleId=capsule_id, selector=str(started["pid"]))).ok()[
            "process"
        ]
        assert by_pid["tag"] == "sleeper"

        signalled = await api.run("SignalProcess", capsuleId=capsule_id, selector="sleeper", signal="SIGTERM")
        assert signalled.ok()["signalProcess"]["tag"] == "sleeper"
        assert await collect_output(server, key, capsule_id, "sleeper") == "ready\n"
        exited = await wait_for_status(api, capsule_id, "sleeper", "EXITED")
        assert exited["signal"] == "SIGTERM" and exited["exitCode"] is None and exited["endedAt"]

        running = (await api.run("Processes", capsuleId=capsule_id, status="RUNNING")).ok()["processes"]
        assert running == []
        ended = (await api.run("Processes", capsuleId=capsule_id, status="EXITED")).ok()["processes"]
        assert [p["signal"] for p in ended] == ["SIGTERM"]

    async def test_signal_by_pid_to_group(self, api: HttpClient, capsule_id: str) -> None:
        started = await start(api, capsule_id, "sh", "-c", "sleep 1000 & sleep 1000")
        assert started["tag"].startswith("proc-")
        answer = await api.run("SignalProcess", capsuleId=capsule_id, selector=str(started["pid"]))
        answer.ok()
        exited = await wait_for_status(api, capsule_id, str(started["pid"]), "EXITED")
        assert exited["signal"] == "SIGKILL"

    async def test_exit_code_is_recorded(self, api: HttpClient, capsule_id: str) -> None:
        await start(api, capsule_id, "sh", "-c", "exit 3", tag="three")
        exited = await wait_for_status(api, capsule_id, "three", "EXITED")
        assert exited["exitCode"] == 3 and exited["signal"] is None and not exited["timedOut"]

    async def test_lifetime_timeout(self, api: HttpClient, capsule_id: str) -> None:
        await start(api, capsule_id, "sleep", "1000", tag="short", timeoutSec=1)
        exited = await wait_for_status(api, capsule_id, "short", "EXITED")
        assert exited["timedOut"] is True and exited["signal"] == "SIGKILL"

    async def test_stop_process_gracefully(self, api: HttpClient, capsule_id: str) -> None:
        script = "trap 'echo bye; exit 7' TERM; touch trapper.up; while :; do sleep 0.1; done"
        await start(api, capsule_id, "sh", "-c", script, tag="trapper")
        await until_file(api, capsule_id, "trapper.up")  # a SIGTERM before the trap would end it
        stopped = (await api.run("StopProcess", capsuleId=capsule_id, selector="trapper", graceSec=5)).ok()
        assert stopped["stopProcess"]["status"] == "EXITED"
        assert stopped["stopProcess"]["exitCode"] == 7

    async def test_stop_process_escalates(self, api: HttpClient, capsule_id: str) -> None:
        script = "trap '' TERM; touch stubborn.up; while :; do sleep 0.1; done"
        await start(api, capsule_id, "sh", "-c", script, tag="stubborn")
        await until_file(api, capsule_id, "stubborn.up")  # a SIGTERM before the trap would end it
        stopped = (await api.run("StopProcess", capsuleId=capsule_id, selector="stubborn", graceSec=1)).ok()
        assert stopped["stopProcess"]["signal"] == "SIGKILL"

    async def test_stdin_round_trip(self, server: Server, key: str, api: HttpClient, capsule_id: str) -> None:
        await start(api, capsule_id, "cat", tag="echo", stdin=True)
        (await api.run("SendInput", capsuleId=capsule_id, selector="echo", data="hello\n")).ok()
        answer = await api.run(
            "SendInput", capsuleId=capsule_id, selector="echo", data="d29ybGQK", encoding="BASE64"
        )
        answer.ok()
        (await api.run("CloseInput", capsuleId=capsule_id, selector="echo")).ok()
        assert await collect_output(server, key, capsule_id, "echo") == "hello\nworld\n"

    async def test_input_without_stdin_is_invalid_state(self, api: HttpClient, capsule_id: str) -> None:
        await start(api, capsule_id, "sleep", "1000", tag="deaf")
        answer = await api.run("SendInput", capsuleId=capsule_id, selector="deaf", data="x")
        assert answer.codes == ["INVALID_STATE"]
        assert "stdin" in answer.errors[0]["message"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_process_events(
    server: Server, key: str, api: HttpClient, capsule_id: str, protocol: str
) -> None:
    def probe() -> Awaitable[object]:
        return start(api, capsule_id, "true")

    async with asyncio.timeout(15):
        async with live_events(
            server.ws_url, key, protocol, capsule_id, until_tag="final", start_probe=probe
        ) as listener:
            await start(api, capsule_id, "sh", "-c", "exit 2", tag="final")
            seen = await listener
    assert seen.index(("STARTED", "final")) < seen.index(("EXITED", "final"))


async def test_records_outlive_the_agents_memory(settings: Settings) -> None:
    async with running_server(replace(settings, retention_sec=0.2)) as server:
        api = HttpClient(server.url, await server.new_key("team-a"))
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            await start(api, capsule_id, "sh", "-c", "exit 9", tag="brief")
            client = server.state.platform.pool.client("local")
            async with asyncio.timeout(10):  # until the agent has dropped it
                while any(p.tag == "brief" for p in await client.list_processes(capsule_id)):
                    await asyncio.sleep(0.05)

            async def on_record() -> Any:
                # The exit recorder writes the exit as its event comes; on a loaded machine that may
                # be after the 0.2 s the agent kept the process, but the record does get it.
                found = (await api.run("Process", capsuleId=capsule_id, selector="brief")).ok()["process"]
                return found if found["status"] == "EXITED" else None

            found = await eventually(on_record, what="the exit to be on record")
            assert found["exitCode"] == 9
            ended = (await api.run("Processes", capsuleId=capsule_id, status="EXITED")).ok()["processes"]
            assert [(p["tag"], p["exitCode"]) for p in ended] == [("brief", 9)]
            key = api.http.headers["Authorization"].removeprefix("Bearer ")
            async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
                with pytest.raises(TransportQueryError) as caught:
                    async for _ in subscribe(
                        session, "ProcessOutput", capsuleId=capsule_id, selector="brief"
                    ):
                        pass
            [error] = caught.value.errors or []
            assert error["extensions"]["code"] == "NOT_FOUND"
            assert "no longer retained" in error["message"]
        finally:
            await api.aclose()

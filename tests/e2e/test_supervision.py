"""Restart policies, readiness and waitForProcess through the API: a real server, agent and processes."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest

from tests.e2e.client import HttpClient, live_events, subscribe, ws_session
from tests.e2e.conftest import Server
from tests.e2e.test_processes import start
from tests.system import free_port

FAST = {"backoffSec": 0.05, "maxBackoffSec": 1.0}


def listener(port: int, after_sec: float = 0.3) -> str:
    """A Python one-liner that listens on port after a while, then sleeps."""
    code = (
        "import socket,time;s=socket.socket();"
        f"time.sleep({after_sec});s.bind(('127.0.0.1',{port}));s.listen();time.sleep(60)"
    )
    return f'{sys.executable} -c "{code}"'


async def wait(api: HttpClient, capsule_id: str, selector: str, **variables: Any) -> dict[str, Any]:
    answer = await api.run("WaitForProcess", capsuleId=capsule_id, selector=selector, **variables)
    return dict(answer.ok()["waitForProcess"])


async def output(server: Server, key: str, capsule_id: str, selector: str) -> list[dict[str, Any]]:
    """Every processOutput event until the stream ends."""
    events = []
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        async with asyncio.timeout(15):
            async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector=selector):
                events.append(result["processOutput"])
    return events


class TestRestarts:
    async def test_a_crashing_process_restarts_in_one_stream_with_its_events(
        self, server: Server, key: str, api: HttpClient, capsule_id: str
    ) -> None:
        async def probe() -> object:
            return await start(api, capsule_id, "true")

        restart = {"policy": "ON_FAILURE", "maxRestarts": 2, **FAST}
        async with live_events(
            server.ws_url, key, "graphql-transport-ws", capsule_id, until_tag="crasher", start_probe=probe
        ) as listener_task:
            started = await start(
                api, capsule_id, "sh", "-c", "echo run; exit 2", tag="crasher", restart=restart
            )
            assert (started["restarts"], started["ready"]) == (0, True)
            final = await wait(api, capsule_id, "crasher", until="EXITED", timeoutSec=10)
            async with asyncio.timeout(10):
                seen = await listener_task
        assert (final["status"], final["exitCode"], final["restarts"]) == ("EXITED", 2, 2)
        assert [kind for kind, tag in seen if tag == "crasher"] == [
            "STARTED",
            "RESTARTED",
            "RESTARTED",
            "EXITED",
        ]
        events = await output(server, key, capsule_id, "crasher")
        kinds = [e["__typename"] for e in events]
        assert kinds == ["OutputChunk", "ProcessRestarted"] * 2 + ["OutputChunk", "ProcessExited"]
        restarted = [e for e in events if e["__typename"] == "ProcessRestarted"]
        assert [(r["restarts"], r["exitCode"], r["signal"]) for r in restarted] == [
            (1, 2, None),
            (2, 2, None),
        ]
        assert len({started["pid"], *(r["pid"] for r in restarted)}) == 3
        assert final["pid"] == restarted[-1]["pid"]
        # The record follows the runs: by the last run's pid it is the same process.
        by_pid = (await api.run("Process", capsuleId=capsule_id, selector=str(final["pid"]))).ok()["process"]
        assert (by_pid["tag"], by_pid["restarts"]) == ("crasher", 2)

    async def test_a_stopped_always_process_stays_stopped(self, api: HttpClient, capsule_id: str) -> None:
        restart = {"policy": "ALWAYS", **FAST}
        await start(api, capsule_id, "sleep", "30", tag="always", restart=restart)
        stopped = (await api.run("StopProcess", capsuleId=capsule_id, selector="always", graceSec=5)).ok()
        assert (stopped["stopProcess"]["status"], stopped["stopProcess"]["restarts"]) == ("EXITED", 0)
        listed = (await api.run("Processes", capsuleId=capsule_id)).ok()["processes"]
        assert [(p["tag"], p["status"], p["restarts"]) for p in listed] == [("always", "EXITED", 0)]


class TestReadinessAndWaiting:
    async def test_wait_until_ready_by_port(self, api: HttpClient, capsule_id: str) -> None:
        port = free_port()
        started = await start(
            api, capsule_id, "sh", "-c", listener(port), tag="web", readiness={"port": port, "timeoutSec": 10}
        )
        assert (started["ready"], started["readyAt"]) == (False, None)
        ready = await wait(api, capsule_id, "web", until="READY", timeoutSec=10)
        assert (ready["status"], ready["ready"]) == ("RUNNING", True) and ready["readyAt"]
        assert (await api.run("Process", capsuleId=capsule_id, selector="web")).ok()["process"]["ready"]

    async def test_wait_until_ready_by_output_pattern(self, api: HttpClient, capsule_id: str) -> None:
        script = "sleep 0.2; echo 'server listening on 8080'; sleep 30"
        readiness = {"outputPattern": r"listening on \d+", "timeoutSec": 10}
        await start(api, capsule_id, "sh", "-c", script, tag="pat", readiness=readiness)
        ready = await wait(api, capsule_id, "pat", timeoutSec=10)  # until READY by default
        assert (ready["status"], ready["ready"]) == ("RUNNING", True)

    async def test_not_ready_in_time_ends_not_ready_and_the_wait_returns(
        self, api: HttpClient, capsule_id: str
    ) -> None:
        readiness = {"outputPattern": "never", "timeoutSec": 1}
        await start(api, capsule_id, "sleep", "30", tag="slow", readiness=readiness)
        ended = await wait(api, capsule_id, "slow", until="READY", timeoutSec=10)
        assert (ended["status"], ended["ready"], ended["signal"]) == ("EXITED", False, "SIGKILL")

    async def test_wait_until_exited(self, api: HttpClient, capsule_id: str) -> None:
        await start(api, capsule_id, "sh", "-c", "sleep 0.3; exit 7", tag="short")
        ended = await wait(api, capsule_id, "short", until="EXITED", timeoutSec=10)
        assert (ended["status"], ended["exitCode"]) == ("EXITED", 7)

    async def test_the_wait_times_out(self, api: HttpClient, capsule_id: str) -> None:
        readiness = {"outputPattern": "never", "timeoutSec": 60}
        await start(api, capsule_id, "sleep", "30", tag="waits", readiness=readiness)
        began = time.monotonic()
        still = await wait(api, capsule_id, "waits", until="READY", timeoutSec=1)
        assert 0.9 <= time.monotonic() - began < 5
        assert (still["status"], still["ready"]) == ("RUNNING", False)
        answer = await api.run(
            "WaitForProcess", capsuleId=capsule_id, selector="waits", until="EXITED", timeoutSec=0
        )
        assert answer.ok()["waitForProcess"]["status"] == "RUNNING"  # 0: the state now

    async def test_a_process_without_a_check_is_ready_at_once(self, api: HttpClient, capsule_id: str) -> None:
        started = await start(api, capsule_id, "sleep", "30", tag="plain")
        assert started["ready"] and started["readyAt"] == started["startedAt"]
        assert (await wait(api, capsule_id, "plain", timeoutSec=10))["ready"]


class TestBadInput:
    @pytest.mark.parametrize(
        ("fields", "words"),
        [
            ({"restart": {"maxRestarts": -1}}, "restart.maxRestarts is -1"),
            ({"restart": {"backoffSec": -0.5}}, "restart.backoffSec is -0.5"),
            ({"restart": {"backoffSec": 1e12, "maxBackoffSec": 1e12}}, "restart.backoffSec"),
            ({"restart": {"backoffSec": 5, "maxBackoffSec": 1}}, "restart.maxBackoffSec"),
            ({"readiness": {"port": 0}}, "readiness.port is 0"),
            ({"readiness": {"port": 65536}}, "readiness.port is 65536"),
            ({"readiness": {"outputPattern": "[unclosed"}}, "readiness.outputPattern is not a valid"),
            ({"readiness": {"outputPattern": "x" * 2000}}, "readiness.outputPattern has 2000 characters"),
            ({"readiness": {"port": 80, "outputPattern": "x"}}, "exactly one of port and outputPattern"),
            ({"readiness": {"port": 80, "timeoutSec": -1}}, "readiness.timeoutSec"),
        ],
    )
    async def test_start_is_invalid_request_naming_the_field(
        self, api: HttpClient, capsule_id: str, fields: dict[str, Any], words: str
    ) -> None:
        answer = await api.run("StartProcess", capsuleId=capsule_id, input={"cmd": "true", **fields})
        assert answer.codes == ["INVALID_REQUEST"], answer.errors
        assert words in answer.errors[0]["message"]

    async def test_wait_with_a_bad_timeout_or_an_unknown_process(
        self, api: HttpClient, capsule_id: str
    ) -> None:
        answer = await api.run("WaitForProcess", capsuleId=capsule_id, selector="nope", timeoutSec=-1)
        assert answer.codes == ["INVALID_REQUEST"] and "timeoutSec" in answer.errors[0]["message"]
        answer = await api.run("WaitForProcess", capsuleId=capsule_id, selector="nope", timeoutSec=1)
        assert answer.codes == ["NOT_FOUND"]

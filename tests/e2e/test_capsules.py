"""Capsules through the API: create, list, destroy, idle timeout."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime
from typing import Any

import pytest

from app.state import EMBEDDED_HOST_ID
from tests.e2e.client import HttpClient, document
from tests.e2e.conftest import Server
from tests.e2e.test_processes import start

DEFAULT_LIMITS = {"maxProcesses": 256, "memoryMiB": None, "cpus": None}


async def test_create_list_get(api: HttpClient) -> None:
    created = (await api.run("CreateCapsule", timeoutSec=120)).ok()["createCapsule"]
    assert created["status"] == "RUNNING" and created["timeoutSec"] == 120 and created["hostId"] == "local"
    assert datetime.fromisoformat(created["createdAt"]).utcoffset() is not None
    listed = (await api.run("Capsules")).ok()["capsules"]
    assert [c["id"] for c in listed] == [created["id"]]
    fetched = (await api.run("Capsule", id=created["id"])).ok()["capsule"]
    assert fetched["id"] == created["id"] and fetched["processes"] == []


async def test_bad_timeout_is_invalid_request(api: HttpClient) -> None:
    assert (await api.run("CreateCapsule", timeoutSec=0)).codes == ["INVALID_REQUEST"]


async def test_destroy_kills_processes(api: HttpClient, capsule_id: str) -> None:
    await start(api, capsule_id, "sleep", "1000", tag="victim")
    destroyed = (await api.run("DestroyCapsule", id=capsule_id)).ok()["destroyCapsule"]
    assert destroyed["status"] == "STOPPED"
    fetched = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
    assert fetched["status"] == "STOPPED"
    assert [p["status"] for p in fetched["processes"]] == ["EXITED"]
    again = (await api.run("DestroyCapsule", id=capsule_id)).ok()["destroyCapsule"]
    assert again["status"] == "STOPPED"


async def test_idle_capsule_is_stopped(api: HttpClient) -> None:
    capsule_id = (await api.run("CreateCapsule", timeoutSec=1)).ok()["createCapsule"]["id"]
    await start(api, capsule_id, "sleep", "1000", tag="idler")
    async with asyncio.timeout(10):
        while True:
            capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
            if capsule["status"] == "STOPPED":
                break
            await asyncio.sleep(0.1)
    assert [p["status"] for p in capsule["processes"]] == ["EXITED"]


async def test_activity_moves_last_active_at(api: HttpClient) -> None:
    created = (await api.run("CreateCapsule", timeoutSec=2)).ok()["createCapsule"]
    async with asyncio.timeout(5):
        while True:  # calls within a tenth of the timeout share one write
            (await api.run("Exec", capsuleId=created["id"], input={"cmd": "true"})).ok()
            capsule = (await api.run("Capsule", id=created["id"])).ok()["capsule"]
            if datetime.fromisoformat(capsule["lastActiveAt"]) > datetime.fromisoformat(
                created["lastActiveAt"]
            ):
                break
    assert capsule["status"] == "RUNNING"


async def test_a_long_exec_keeps_its_capsule_from_going_idle(api: HttpClient) -> None:
    capsule_id = (await api.run("CreateCapsule", timeoutSec=1)).ok()["createCapsule"]["id"]
    ran = await api.run(
        "Exec", capsuleId=capsule_id, input={"cmd": "sh", "args": ["-c", "sleep 2.5; echo done"]}
    )
    assert ran.ok()["exec"]["stdout"] == "done\n"
    capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
    assert capsule["status"] == "RUNNING"


class TestNetworkAndLimits:
    async def test_defaults(self, api: HttpClient) -> None:
        created = (await api.run("CreateCapsule")).ok()["createCapsule"]
        assert (created["network"], created["limits"]) == (False, DEFAULT_LIMITS)
        # Left out inside limits, a field is the server's default; the others stay as asked.
        partly = (await api.run("CreateCapsule", limits={"cpus": 0.5})).ok()["createCapsule"]
        assert partly["limits"] == DEFAULT_LIMITS | {"cpus": 0.5}
        nulls = {"maxProcesses": None, "memoryMiB": None, "cpus": None}
        explicit = (await api.run("CreateCapsule", network=None, limits=nulls)).ok()["createCapsule"]
        assert (explicit["network"], explicit["limits"]) == (False, DEFAULT_LIMITS)

    async def test_created_with_network_and_limits_reads_them_back(
        self, api: HttpClient, server: Server
    ) -> None:
        limits = {"maxProcesses": 64, "memoryMiB": 512, "cpus": 1.5}
        created = (await api.run("CreateCapsule", network=True, limits=limits)).ok()["createCapsule"]
        assert (created["status"], created["network"], created["limits"]) == ("RUNNING", True, limits)
        fetched = (await api.run("Capsule", id=created["id"])).ok()["capsule"]
        assert (fetched["network"], fetched["limits"]) == (True, limits)
        [listed] = (await api.run("Capsules")).ok()["capsules"]
        assert (listed["network"], listed["limits"]) == (True, limits)
        # The host was told, not only the store.
        hosted = await server.state.platform.pool.client(EMBEDDED_HOST_ID).get_capsule(created["id"])
        assert hosted.network is True
        assert (hosted.limits.max_processes, hosted.limits.memory_mib, hosted.limits.cpus) == (64, 512, 1.5)

    @pytest.mark.parametrize(
        ("limits", "words"),
        [
            ({"maxProcesses": 0}, "limits.maxProcesses is 0: pass 1 to 65536 processes"),
            ({"maxProcesses": 65537}, "limits.maxProcesses is 65537: pass 1 to 65536 processes"),
            ({"memoryMiB": 63}, "limits.memoryMiB is 63: pass 64 to 1048576 MiB"),
            ({"memoryMiB": -1}, "limits.memoryMiB is -1: pass 64 to 1048576 MiB"),
            ({"cpus": 0}, "limits.cpus is 0.0: pass 0.01 to 1024 cores"),
            ({"cpus": -2.5}, "limits.cpus is -2.5: pass 0.01 to 1024 cores"),
            ({"cpus": 1025}, "limits.cpus is 1025.0: pass 0.01 to 1024 cores"),
        ],
    )
    async def test_bad_limits_are_invalid_request_naming_the_field(
        self, api: HttpClient, limits: dict[str, Any], words: str
    ) -> None:
        answer = await api.run("CreateCapsule", limits=limits)
        assert answer.codes == ["INVALID_REQUEST"]
        assert answer.errors[0]["message"] == words
        assert (await api.run("Capsules")).ok()["capsules"] == []

    @pytest.mark.parametrize(
        "limits",
        [{"maxProcesses": 2**31}, {"cpus": "two"}],
        ids=["int32", "text"],
    )
    async def test_a_limit_graphql_cannot_carry_is_invalid_request_naming_the_field(
        self, api: HttpClient, limits: dict[str, Any]
    ) -> None:
        answer = await api.run("CreateCapsule", limits=limits)
        assert answer.codes == ["INVALID_REQUEST"]
        message = answer.errors[0]["message"]
        assert "$limits" in message and next(iter(limits)) in message

    async def test_cpus_nan_is_invalid_request(self, api: HttpClient) -> None:
        # httpx refuses to send NaN; Python's json (and so Starlette) reads it, as other clients send it.
        body = json.dumps({"query": document("CreateCapsule"), "variables": {"limits": {"cpus": math.nan}}})
        response = await api.http.post(api.url, content=body, headers={"Content-Type": "application/json"})
        [error] = response.json()["errors"]
        assert error["extensions"]["code"] == "INVALID_REQUEST" and "cpus" in error["message"]


class TestRuntimeAndUsage:
    async def test_runtime_is_the_one_the_host_reports(self, api: HttpClient, server: Server) -> None:
        created = (await api.run("CreateCapsule")).ok()["createCapsule"]
        hosted = await server.state.platform.pool.client(EMBEDDED_HOST_ID).get_capsule(created["id"])
        assert created["runtime"] == hosted.runtime.value
        fetched = (await api.run("Capsule", id=created["id"])).ok()["capsule"]
        assert fetched["runtime"] == hosted.runtime.value

    async def test_usage_is_null_on_plain_and_measured_on_sandbox(
        self, api: HttpClient, capsule_id: str
    ) -> None:
        await start(api, capsule_id, "sleep", "1000", tag="sleeper")
        capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
        usage = capsule["usage"]
        if capsule["runtime"] == "PLAIN":
            assert usage is None
        else:
            assert usage is not None and usage["processes"] >= 1
            assert 0 <= usage["memoryBytes"] <= usage["memoryPeakBytes"] and usage["cpuSec"] >= 0

    async def test_a_stopped_capsule_has_no_usage(self, api: HttpClient, capsule_id: str) -> None:
        (await api.run("DestroyCapsule", id=capsule_id)).ok()
        capsule = (await api.run("Capsule", id=capsule_id)).ok()["capsule"]
        assert (capsule["status"], capsule["usage"]) == ("STOPPED", None)

"""Capsules through the API: create, list, destroy, idle timeout."""

from __future__ import annotations

import asyncio
from datetime import datetime

from tests.e2e.client import HttpClient
from tests.e2e.test_processes import start


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

"""Host uids of sandboxed capsules: each held by one agent at a time, whatever agents share the host."""

from __future__ import annotations

from pathlib import Path

import grpc

from app.agent.server import start_agent
from app.agent.uids import UidRegistry
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from tests.agent.conftest import agent_settings, workspace_on_host

FIRST = 250_000  # far from the agents' own range, so these registries meet none of theirs


def test_a_uid_is_held_by_one_registry_at_a_time(tmp_path: Path) -> None:
    one, two = UidRegistry(FIRST, 3, tmp_path), UidRegistry(FIRST, 3, tmp_path)
    try:
        assert one.take() == FIRST
        assert two.take() == FIRST + 1  # FIRST is one's
        assert not two.claim(FIRST)
        one.retain([])
        assert two.claim(FIRST)  # let go: free for anyone
        assert one.take() == FIRST + 2
    finally:
        one.close()
        two.close()


def test_a_uid_let_go_is_taken_again_last(tmp_path: Path) -> None:
    registry = UidRegistry(FIRST, 4, tmp_path)
    try:
        assert [registry.take() for _ in range(2)] == [FIRST, FIRST + 1]
        registry.retain([FIRST + 1])  # FIRST's capsule was destroyed
        assert [registry.take() for _ in range(2)] == [FIRST + 2, FIRST + 3]
        assert registry.take() == FIRST  # only once the rest of the range has been handed out
    finally:
        registry.close()


def test_the_last_uid_taken_leaves_none(tmp_path: Path) -> None:
    registry = UidRegistry(FIRST, 1, tmp_path)
    try:
        registry.take()
        try:
            registry.take()
        except Exception as exc:  # RateLimited, as the API answers it
            assert "as many sandboxes as it has uids" in str(exc)
        else:
            raise AssertionError("a second uid was handed out of a range of one")
    finally:
        registry.close()


async def test_two_agents_on_one_host_never_share_a_uid(tmp_path: Path) -> None:
    handles = [
        await start_agent("127.0.0.1:0", agent_settings(tmp_path / name, runtime="sandbox"))
        for name in ("one", "two")
    ]
    try:
        owners: dict[str, set[int]] = {}
        for name, handle in zip(("one", "two"), handles, strict=True):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                stub = agent_pb2_grpc.AgentStub(channel)
                for capsule_id in ("a", "b"):
                    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule_id))
            owners[name] = {workspace_on_host(tmp_path / name, c).stat().st_uid for c in ("a", "b")}
        assert len(owners["one"]) == len(owners["two"]) == 2
        assert not owners["one"] & owners["two"]
    finally:
        for handle in handles:
            await handle.stop()


async def test_a_capsule_whose_uid_another_agent_took_meanwhile_resumes_on_a_new_one(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, runtime="sandbox")
    handle = await start_agent("127.0.0.1:0", settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="kept"))
            await stub.Exec(pb.ExecRequest(capsule_id="kept", cmd="sh", args=["-c", "echo mine > note"]))
    finally:
        await handle.stop()  # the capsule stays on disk, for the next agent
    workspace = workspace_on_host(tmp_path, "kept")
    before = workspace.stat().st_uid
    squatter = UidRegistry(before, 1)  # the host's own registry: as another agent would hold it
    assert squatter.claim(before)
    try:
        handle = await start_agent("127.0.0.1:0", settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                stub = agent_pb2_grpc.AgentStub(channel)
                reply = await stub.Exec(
                    pb.ExecRequest(capsule_id="kept", cmd="sh", args=["-c", "cat note; echo more >> note"])
                )
                assert (reply.exit_code, reply.stdout) == (0, b"mine\n")
            after = workspace.stat().st_uid
            assert after != before and (workspace / "note").stat().st_uid == after
        finally:
            await handle.stop()
    finally:
        squatter.close()

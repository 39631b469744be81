"""Every bad input gets its gRPC status and a message that says what to change."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from app.pb import agent_pb2 as pb
from tests.agent.conftest import workspace_on_host
from tests.agent.helpers import grpc_error, ref, start_sh

INVALID = grpc.StatusCode.INVALID_ARGUMENT

# (request fields, words the message must contain)
BAD_STARTS: list[tuple[dict[str, Any], str]] = [
    ({"cmd": ""}, "cmd is empty"),
    ({"cmd": "   "}, "cmd is empty"),
    ({"cmd": "no-such-program-here"}, "'no-such-program-here' not found"),
    ({"cmd": "/tmp"}, "cannot be executed"),
    ({"cmd": "./not-executable"}, "cannot be executed"),
    ({"cmd": "./no-shebang"}, "not an executable"),
    ({"cmd": "true", "tag": "1234"}, "all digits"),
    ({"cmd": "true", "tag": "-dash-first"}, "malformed"),
    ({"cmd": "true", "tag": "has space"}, "malformed"),
    ({"cmd": "true", "tag": "x" * 65}, "tag has 65 characters; at most 64 are allowed"),
    ({"cmd": "true", "timeout_sec": -1}, "negative"),
    ({"cmd": "true", "cwd": ".."}, "outside the capsule's workspace"),
    ({"cmd": "true", "cwd": "/tmp"}, "outside the capsule's workspace"),
    ({"cmd": "true", "cwd": "escape"}, "outside the capsule's workspace"),  # a symlink out
    ({"cmd": "true", "cwd": "missing"}, "not a directory"),
    ({"cmd": "true", "cwd": "a-file"}, "not a directory"),
    ({"cmd": "true", "envs": [pb.EnvVar(name="1BAD", value="x")]}, "env name"),
    ({"cmd": "true", "envs": [pb.EnvVar(name="A=B", value="x")]}, "env name"),
    ({"cmd": "true", "envs": [pb.EnvVar(name="", value="x")]}, "env name"),
    ({"cmd": "true", "args": ["nul\0byte"]}, "NUL"),
]


@pytest.fixture
async def workspace(capsule: str, tmp_path: Path) -> Path:
    """The capsule's workspace on the host, with a few files the bad requests point at."""
    path = workspace_on_host(tmp_path, capsule)

    def populate() -> None:
        (path / "a-file").write_text("x")
        (path / "not-executable").write_text("#!/bin/sh\n")
        script = path / "no-shebang"
        script.write_bytes(b"\x7fELF-not-really")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (path / "escape").symlink_to("/tmp")

    await asyncio.to_thread(populate)
    return path


@pytest.mark.parametrize(("fields", "words"), BAD_STARTS)
async def test_bad_start_requests(
    stub: Any, capsule: str, workspace: Path, fields: dict[str, Any], words: str
) -> None:
    error = await grpc_error(stub.StartProcess(pb.StartRequest(capsule_id=capsule, **fields)))
    assert error.code() is INVALID, error.details()
    assert words in error.details()


@pytest.mark.parametrize(("fields", "words"), [b for b in BAD_STARTS if "tag" not in b[0]])
async def test_bad_exec_requests(
    stub: Any, capsule: str, workspace: Path, fields: dict[str, Any], words: str
) -> None:
    error = await grpc_error(stub.Exec(pb.ExecRequest(capsule_id=capsule, **fields)))
    assert error.code() is INVALID, error.details()
    assert words in error.details()


async def test_a_duplicate_tag_conflicts(stub: Any, capsule: str) -> None:
    first = await start_sh(stub, capsule, "sleep 1000", tag="web")
    error = await grpc_error(stub.StartProcess(pb.StartRequest(capsule_id=capsule, cmd="true", tag="web")))
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert f"already used by process {first.pid}" in error.details()


async def test_unknown_processes_are_not_found(stub: Any, capsule: str) -> None:
    calls = [
        stub.GetProcess(ref(capsule, "ghost")),
        stub.GetProcess(ref(capsule, 999999999)),
        stub.SignalProcess(pb.SignalRequest(process=ref(capsule, "ghost"), signal=15)),
        stub.StopProcess(pb.StopRequest(process=ref(capsule, "ghost"))),
        stub.SendInput(pb.InputRequest(process=ref(capsule, "ghost"), data=b"x")),
        stub.CloseInput(ref(capsule, "ghost")),
    ]
    for call in calls:
        error = await grpc_error(call)
        assert error.code() is grpc.StatusCode.NOT_FOUND
        assert "no process ghost" in error.details() or "no process 999999999" in error.details()


async def test_an_empty_selector(stub: Any, capsule: str) -> None:
    error = await grpc_error(stub.GetProcess(ref(capsule, "")))
    assert error.code() is INVALID


async def test_a_negative_grace(stub: Any, capsule: str) -> None:
    info = await start_sh(stub, capsule, "sleep 1000")
    error = await grpc_error(stub.StopProcess(pb.StopRequest(process=ref(capsule, info.pid), grace_sec=-1)))
    assert error.code() is INVALID
    assert "graceSec" in error.details()

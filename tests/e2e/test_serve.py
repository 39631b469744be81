"""`capsule serve` run as the README says: embedded default, the key it writes, a clean Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.client import HttpClient
from tests.system import capsule_alive, command_env, free_port

CAPSULE = Path(sys.executable).parent / "capsule"


def _environment() -> dict[str, str]:
    return command_env()


async def _start_serve(cwd: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    """A `capsule serve` in cwd, once it listens, and what it printed until then."""
    server = subprocess.Popen(
        [str(CAPSULE), "serve", "--port", str(port)],
        cwd=cwd,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert server.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("Uvicorn running" in line for line in printed):  # it listens from then on
                line = await asyncio.to_thread(server.stdout.readline)
                assert line, f"serve ended early: {''.join(printed)}"
                printed.append(line.decode())
    except BaseException:
        _kill(server)
        raise
    return server, "".join(printed)


async def _refused(cwd: Path, *args: str) -> tuple[int, str]:
    """Runs a second `capsule` command that must give up; its exit code and stderr."""
    second = subprocess.Popen(
        [str(CAPSULE), *args],
        cwd=cwd,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(20):
            _, stderr = await asyncio.to_thread(second.communicate)
    except TimeoutError:
        pytest.fail(f"`capsule {' '.join(args)}` on a data directory in use kept running")
    finally:
        _kill(second)
    return second.returncode, stderr.decode()


async def _stop(server: subprocess.Popen[bytes]) -> int:
    server.send_signal(signal.SIGINT)
    async with asyncio.timeout(15):
        return await asyncio.to_thread(server.wait)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def test_serve_embedded_default(tmp_path: Path) -> None:
    port = free_port()
    server, printed = await _start_serve(tmp_path, port)
    try:
        assert f"http://localhost:{port}/graphql" in printed
        key = (tmp_path / ".capsule" / "dev-api-key").read_text().strip()
        assert key in printed
        api = HttpClient(f"http://127.0.0.1:{port}/graphql", key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            result = (await api.run("Exec", capsuleId=capsule_id, input={"cmd": "echo", "args": ["hi"]})).ok()
            assert result["exec"]["stdout"] == "hi\n"
            started = await api.run(
                "StartProcess", capsuleId=capsule_id, input={"cmd": "sleep", "args": ["1000"]}
            )
            pid = started.ok()["startProcess"]["pid"]
            graphiql = await api.http.get(f"http://127.0.0.1:{port}/graphql", headers={"Accept": "text/html"})
            assert graphiql.status_code == 200 and "graphiql" in graphiql.text.lower()
        finally:
            await api.aclose()
        assert await _stop(server) == 0
        assert not capsule_alive(capsule_id, pid), "Ctrl-C must kill the processes the server started"
    finally:
        _kill(server)


async def test_a_second_start_on_the_same_data_leaves_the_first_alone(tmp_path: Path) -> None:
    port = free_port()
    server, _ = await _start_serve(tmp_path, port)
    try:
        data_dir = (tmp_path / ".capsule").resolve()
        api = HttpClient(f"http://127.0.0.1:{port}/graphql", (data_dir / "dev-api-key").read_text().strip())
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            started = await api.run(
                "StartProcess", capsuleId=capsule_id, input={"cmd": "sleep", "args": ["1000"]}
            )
            pid = started.ok()["startProcess"]["pid"]

            code, stderr = await _refused(tmp_path, "serve", "--port", str(free_port()))
            assert code != 0
            assert str(data_dir) in stderr and f"process {server.pid}" in stderr, stderr
            assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
            # The embedded agent's directory is taken too: an agent alone cannot sweep it either.
            code, stderr = await _refused(tmp_path, "agent", "--listen", f"127.0.0.1:{free_port()}")
            assert code != 0
            assert str(data_dir / "agent") in stderr and f"process {server.pid}" in stderr, stderr
            assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr

            assert capsule_alive(capsule_id, pid), (
                "a refused start must not kill what the running server supervises"
            )
            answer = (await api.run("Process", capsuleId=capsule_id, selector=str(pid))).ok()
            assert answer["process"]["status"] == "RUNNING"
        finally:
            await api.aclose()
        assert await _stop(server) == 0
        assert not capsule_alive(capsule_id, pid)
    finally:
        _kill(server)

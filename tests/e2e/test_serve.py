"""`capsule serve` run as the README says: embedded default, the key it writes, a clean Ctrl-C, and
the README's curl and follow.py examples as written."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.client import HttpClient
from tests.system import capsule_alive, command_env, free_port

CAPSULE = Path(sys.executable).parent / "capsule"
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


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


def _readme_blocks(section: str) -> dict[str, list[str]]:
    """The fenced blocks of one README section (from its heading to the next), by language."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks: dict[str, list[str]] = {}
    for match in re.finditer(r"^```(\w+)\n(.*?)^```$", text[start:end], re.S | re.M):
        blocks.setdefault(match[1], []).append(match[2])
    return blocks


async def test_the_readmes_follow_example_runs_as_written(tmp_path: Path) -> None:
    curl = _readme_blocks("Try it with curl")["sh"][0]
    follow = _readme_blocks("Follow output from Python")
    install, run = follow["sh"]
    # Its own steps install what follow.py imports: the server's install alone has no gql.
    assert "pip install" in install and "'gql[websockets]'" in install, install
    assert run.strip() == ".venv/bin/python follow.py", run
    (script,) = follow["python"]
    assert "from gql.transport.websockets import" in script
    __import__("gql.transport.websockets")  # what the install step gave this environment (the dev extra)

    port = free_port()
    (tmp_path / "graphql").symlink_to(ROOT / "graphql")  # as in the repository, where it is saved
    (tmp_path / "follow.py").write_text(script.replace("localhost:8000", f"localhost:{port}"))
    server, _ = await _start_serve(tmp_path, port)
    try:

        async def execute(*argv: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                subprocess.run,
                argv,
                cwd=tmp_path,
                env=_environment(),
                capture_output=True,
                text=True,
                timeout=60,
            )

        made = await execute(
            "bash", "-euo", "pipefail", "-c", curl.replace("localhost:8000", f"localhost:{port}")
        )
        assert made.returncode == 0, made.stderr
        assert '"exitCode":0' in made.stdout and '"tag":"ticker"' in made.stdout, made.stdout
        followed = await execute(sys.executable, "follow.py")
        assert followed.returncode == 0, followed.stderr
        # Replayed output may arrive merged (several ticks in one chunk); the exit comes last, once.
        for tick in ("tick 1\n", "tick 2\n", "tick 3\n"):
            assert followed.stdout.count(tick) == 1, followed.stdout
        assert followed.stdout.splitlines()[-1] == "exited: 0 None", followed.stdout
        assert await _stop(server) == 0
    finally:
        _kill(server)

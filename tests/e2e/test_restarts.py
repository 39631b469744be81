"""Restarts nobody notices: `capsule serve` stopped with SIGTERM (WebSockets close with 1001 and
clients resume against the separate agent with no duplicate and no hole), killed with SIGKILL
(nothing stays RUNNING that is not), and the embedded default's exits recorded before it exits,
with its log in JSON."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import HttpClient, document
from tests.e2e.test_processes import start, wait_for_status
from tests.system import capsule_alive, command_env, free_port

CAPSULE = Path(sys.executable).parent / "capsule"
DEADLINE_SEC = 30.0
# Output that never stops: numbered lines, so that a hole or a duplicate shows in the text too.
COUNTER = 'i=0; while true; do echo "line $i"; i=$((i+1)); sleep 0.002; done'


@dataclass
class Serve:
    """A `capsule serve` subprocess on a data directory that outlives it."""

    cwd: Path
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # capsule's own, before the command

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def key(self) -> str:
        return (self.cwd / ".capsule" / "dev-api-key").read_text().strip()

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(CAPSULE), *self.options, "serve", "--port", str(self.port)],
                cwd=self.cwd,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        async with asyncio.timeout(DEADLINE_SEC), httpx.AsyncClient() as client:
            while True:
                assert self.process.poll() is None, f"serve ended early: {self.log.read_text()}"
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        async with asyncio.timeout(DEADLINE_SEC):
            return await asyncio.to_thread(self.process.wait)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@asynccontextmanager
async def separate_agent(tmp_path: Path) -> AsyncIterator[str]:
    """`capsule agent` on a free port with a data directory of its own; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    agent = subprocess.Popen(
        [str(CAPSULE), "agent", "--listen", address],
        env=command_env(CAPSULE_DATA_DIR=str(tmp_path / "agent-data")),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "agent.log").open("wb"),
        start_new_session=True,
    )
    try:
        host, port = address.rsplit(":", 1)
        async with asyncio.timeout(DEADLINE_SEC):
            while True:
                assert agent.poll() is None, (tmp_path / "agent.log").read_text()
                try:
                    _, writer = await asyncio.open_connection(host, int(port))
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        yield address
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(agent.wait), 15)
            except TimeoutError:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


@asynccontextmanager
async def serving(tmp_path: Path, **env: str) -> AsyncIterator[Serve]:
    cwd = tmp_path / "serve"
    cwd.mkdir(exist_ok=True)
    serve = Serve(cwd=cwd, port=free_port(), env=command_env(**env), log=tmp_path / "serve.log")
    await serve.start()
    try:
        yield serve
    finally:
        serve.kill()


@dataclass
class Output:
    """What one processOutput subscription over a raw graphql-transport-ws socket received."""

    events: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["__typename"] == "OutputChunk"]


async def follow(
    serve: Serve, capsule_id: str, selector: str, from_seq: int, output: Output, *, until_chunks: int | None
) -> None:
    """Subscribes and appends each event to output; returns once until_chunks chunks are in (then
    the socket closes), or when the server closes the socket (its code kept)."""
    async with websockets.connect(
        f"ws://127.0.0.1:{serve.port}/graphql", subprotocols=[websockets.Subprotocol("graphql-transport-ws")]
    ) as socket:
        await socket.send(
            json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {serve.key}"}})
        )
        assert json.loads(await socket.recv())["type"] == "connection_ack"
        variables = {"capsuleId": capsule_id, "selector": selector, "fromSeq": from_seq}
        payload = {"query": document("ProcessOutput"), "variables": variables}
        await socket.send(json.dumps({"type": "subscribe", "id": "1", "payload": payload}))
        chunks = 0
        try:
            async for raw in socket:
                message = json.loads(raw)
                if message["type"] == "ping":
                    await socket.send(json.dumps({"type": "pong"}))
                    continue
                assert message["type"] == "next", message
                event = message["payload"]["data"]["processOutput"]
                output.events.append(event)
                chunks += event["__typename"] == "OutputChunk"
                if until_chunks is not None and chunks >= until_chunks:
                    return
        except ConnectionClosed as closed:
            output.close_code = closed.rcvd.code if closed.rcvd is not None else None
            return
        output.close_code = socket.close_code


def assert_contiguous(events: list[dict[str, Any]]) -> None:
    # A merged chunk carries the seq of the last chunk it joins: seqs rise, by one or more.
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(seqs)), "a duplicate seq"
    lines = "".join(e["data"] for e in events if e["__typename"] == "OutputChunk").splitlines()
    complete = lines[:-1]  # the last may be cut mid-line
    numbers = [int(line.removeprefix("line ")) for line in complete]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "a hole or a duplicate in the text"


async def test_sigterm_closes_websockets_with_1001_and_clients_resume(tmp_path: Path) -> None:
    async with separate_agent(tmp_path) as address, serving(tmp_path, CAPSULE_HOSTS=f"h1={address}") as serve:
        api = HttpClient(f"{serve.url}/graphql", serve.key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            await start(api, capsule_id, "sh", "-c", COUNTER, tag="counter")
        finally:
            await api.aclose()

        before = Output()
        reader = asyncio.create_task(follow(serve, capsule_id, "counter", 0, before, until_chunks=None))
        async with asyncio.timeout(DEADLINE_SEC):
            while len(before.chunks) < 20:
                assert not reader.done(), reader.result()
                await asyncio.sleep(0.02)
        assert await serve.stop(signal.SIGTERM) == 0
        await asyncio.wait_for(reader, DEADLINE_SEC)
        assert before.close_code == 1001, before.close_code

        await serve.start()  # the same port and data; the agent kept the process and its output
        after = Output()
        resume_from = before.events[-1]["seq"] + 1
        await asyncio.wait_for(
            follow(serve, capsule_id, "counter", resume_from, after, until_chunks=20), DEADLINE_SEC
        )
        assert after.events[0]["seq"] >= resume_from, after.events[:2]
        assert_contiguous(before.events + after.events)
        await serve.stop(signal.SIGTERM)


async def test_sigkill_of_serve_leaves_nothing_running_that_is_not(tmp_path: Path) -> None:
    async with separate_agent(tmp_path) as address, serving(tmp_path, CAPSULE_HOSTS=f"h1={address}") as serve:
        api = HttpClient(f"{serve.url}/graphql", serve.key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            lasting = [await start(api, capsule_id, "sleep", "1000", tag=f"lasting-{i}") for i in range(2)]
            short = [
                await start(api, capsule_id, "sh", "-c", "sleep 1; exit 3", tag=f"short-{i}")
                for i in range(2)
            ]
        finally:
            await api.aclose()
        assert await serve.stop(signal.SIGKILL) == -signal.SIGKILL
        # The short ones end while no API server watches.
        async with asyncio.timeout(DEADLINE_SEC):
            while any(capsule_alive(capsule_id, p["pid"]) for p in short):
                await asyncio.sleep(0.05)

        await serve.start()
        api = HttpClient(f"{serve.url}/graphql", serve.key)
        try:
            for process in short:
                ended = await wait_for_status(api, capsule_id, process["tag"], "EXITED")
                assert ended["exitCode"] == 3, ended
            listed = (await api.run("Processes", capsuleId=capsule_id)).ok()["processes"]
            running = {p["tag"] for p in listed if p["status"] == "RUNNING"}
            assert running == {p["tag"] for p in lasting}
            assert all(capsule_alive(capsule_id, p["pid"]) for p in listed if p["status"] == "RUNNING")
        finally:
            await api.aclose()
        await serve.stop(signal.SIGTERM)


async def test_sigterm_of_the_embedded_default_records_every_exit_and_logs_json(tmp_path: Path) -> None:
    async with serving(tmp_path, CAPSULE_LOG_FORMAT="json") as serve:
        api = HttpClient(f"{serve.url}/graphql", serve.key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            sleeper = await start(api, capsule_id, "sleep", "1000", tag="sleeper")
            counter = await start(api, capsule_id, "sh", "-c", COUNTER, tag="counter")
            (await api.run("Processes", capsuleId="nosuchcapsule")).codes  # noqa: B018 - a logged request
        finally:
            await api.aclose()
        output = Output()
        reader = asyncio.create_task(follow(serve, capsule_id, "counter", 0, output, until_chunks=None))
        async with asyncio.timeout(DEADLINE_SEC):
            while not output.chunks:
                assert not reader.done(), reader.result()
                await asyncio.sleep(0.02)

        assert await serve.stop(signal.SIGTERM) == 0
        await asyncio.wait_for(reader, DEADLINE_SEC)
        assert output.close_code == 1001
        for process in (sleeper, counter):
            assert not capsule_alive(capsule_id, process["pid"])
        # Recorded before the server exited: the store says so with nothing else running.
        database = serve.cwd / ".capsule" / "capsule.db"
        with closing(sqlite3.connect(database)) as connection:
            rows = connection.execute("SELECT tag, status, signal FROM process_record").fetchall()
        assert sorted(rows) == [("counter", "EXITED", "SIGKILL"), ("sleeper", "EXITED", "SIGKILL")], rows

    entries = [json.loads(line) for line in serve.log.read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    events = [entry for entry in entries if "event" in entry]
    kinds = [entry["event"] for entry in events]
    assert kinds.count("capsule.created") == 1 and kinds.count("process.started") == 2
    exits = {entry["tag"]: entry for entry in events if entry["event"] == "process.exited"}
    assert {tag: e["outcome"] for tag, e in exits.items()} == {"sleeper": "signal", "counter": "signal"}
    assert all(e["capsule"] == capsule_id and isinstance(e["pid"], int) for e in exits.values())
    access = [entry for entry in entries if entry["logger"] == "uvicorn.access"]
    assert any("POST /graphql" in entry["msg"] for entry in access)
    assert serve.key not in serve.log.read_text()


async def test_the_log_level_holds_for_the_access_log_too(tmp_path: Path) -> None:
    cwd = tmp_path / "serve"
    cwd.mkdir()
    options = ("--log-level", "WARNING")
    serve = Serve(cwd=cwd, port=free_port(), env=command_env(), log=tmp_path / "serve.log", options=options)
    await serve.start()
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {serve.key}"}) as client:
            answer = await client.post(f"{serve.url}/graphql", json={"query": "{ __typename }"})
            assert answer.status_code == 200
    finally:
        assert await serve.stop(signal.SIGTERM) == 0
    logged = serve.log.read_text()
    assert "POST /graphql" not in logged and "/readyz" not in logged, logged
    assert " INFO " not in logged, logged


def test_an_unknown_log_format_is_refused_at_start(tmp_path: Path) -> None:
    env = command_env(CAPSULE_LOG_FORMAT="xml", CAPSULE_DATA_DIR=str(tmp_path))
    command = [str(CAPSULE), "migrate"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "CAPSULE_LOG_FORMAT='xml': use plain or json" in result.stderr


async def test_sigterm_lets_a_mutation_in_flight_finish(tmp_path: Path) -> None:
    async with serving(tmp_path) as serve:
        api = HttpClient(f"{serve.url}/graphql", serve.key)
        try:
            capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
            workspace = serve.cwd / ".capsule" / "agent" / "capsules" / capsule_id / "workspace"
            command = {"cmd": "sh", "args": ["-c", "touch started; sleep 1; echo finished"]}
            call = asyncio.create_task(api.run("Exec", capsuleId=capsule_id, input=command))
            async with asyncio.timeout(DEADLINE_SEC):
                while not (workspace / "started").exists():
                    assert not call.done(), call.result()
                    await asyncio.sleep(0.02)
            assert serve.process is not None
            serve.process.send_signal(signal.SIGTERM)  # while the exec runs
            answer = await asyncio.wait_for(call, DEADLINE_SEC)
            assert answer.ok()["exec"]["stdout"] == "finished\n"
        finally:
            await api.aclose()
        async with asyncio.timeout(DEADLINE_SEC):
            assert await asyncio.to_thread(serve.process.wait) == 0

"""Milliseconds from createCapsule to a RUNNING capsule, and the `exec true` round trip, on the
sandbox runtime beside the plain one, measured in the same run.

Run by hand, as root where a sandbox works: .venv/bin/python -m bench.capsule_start [--runs N] [--execs N]
Two API servers in this process, each with its embedded agent, one per runtime, each on a SQLite file
of its own; every run does the same on both, one after the other, so both see the same machine.
Two layers: the API (GraphQL over HTTP, as a client sees it) and the agent alone (its gRPC: what the
runtime itself costs). Targets: a sandboxed capsule ready in at most 150 ms through the API (p95, with a
spare sandbox ready, as at a rate of creates the host keeps up with; the same runs back to back show
what a burst beyond the spares costs); exec through a sandbox at most 1.5 times exec on plain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import uvicorn

from app.agent.sandbox import SandboxRuntime
from app.config import Settings
from app.main import create_app
from app.pb import agent_pb2 as pb
from app.pb import agent_pb2_grpc
from app.state import AppState
from app.store.migrate import upgrade

RUNTIMES = ("sandbox", "plain")
READY_TARGET_MS = 150.0
EXEC_TARGET_RATIO = 1.5
CREATE = "mutation { createCapsule { id status runtime } }"
EXEC = 'mutation($id: ID!) { exec(capsuleId: $id, input: {cmd: "true"}) { exitCode } }'
DESTROY = "mutation($id: ID!) { destroyCapsule(id: $id) { status } }"


@dataclass
class Served:
    """One runtime's server: its GraphQL endpoint with a key, and its agent's gRPC stub."""

    runtime: str
    http: httpx.AsyncClient
    url: str
    agent: Any  # agent_pb2_grpc.AgentStub
    data_dir: Path
    times: dict[str, list[float]] = field(default_factory=dict)

    async def query(self, text: str, **variables: Any) -> dict[str, Any]:
        answer = (await self.http.post(self.url, json={"query": text, "variables": variables})).json()
        if answer.get("errors"):
            raise RuntimeError(f"{self.runtime}: {answer['errors']}")
        return dict(answer["data"])

    async def timed(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        began = time.perf_counter()
        result = await call()
        self.times.setdefault(name, []).append((time.perf_counter() - began) * 1000)
        return result


@contextlib.asynccontextmanager
async def serve(runtime: str, directory: Path) -> AsyncIterator[Served]:
    """An API server with its embedded agent on the runtime, until the block ends."""
    settings = Settings(data_dir=directory / "data", runtime=runtime, reconcile_interval_sec=3600.0)
    settings.data_dir.mkdir(parents=True)
    # alembic's env.py calls asyncio.run: clear of this loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(upgrade, settings.database_url).result()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        state: AppState = app.state.capsule
        assert state.agent is not None
        _, key = await state.platform.keys.create_key("bench")
        port = server.servers[0].sockets[0].getsockname()[1]
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            httpx.AsyncClient(headers=headers, timeout=30) as http,
            grpc.aio.insecure_channel(state.agent.address) as channel,
        ):
            url = f"http://127.0.0.1:{port}/graphql"
            yield Served(runtime, http, url, agent_pb2_grpc.AgentStub(channel), settings.data_dir)
    finally:
        server.should_exit = True
        await task


async def spare_ready(served: Served) -> None:
    """Returns once the agent holds a spare sandbox ready to take (at most 30 s)."""
    spares = served.data_dir / "agent" / "spares"
    async with asyncio.timeout(30):
        while not any((d / "run" / "agent.sock").exists() for d in spares.glob("*")):
            await asyncio.sleep(0.005)


async def one_run(served: Served, name: str, execs: int, *, measured: bool, paced: bool) -> None:
    """A capsule created, exec'd in and destroyed, through the API and then through the agent alone.
    paced: each sandboxed create waits first for a spare to be ready, as creates at a rate the host
    keeps up with find one; unpaced, creates come back to back and outrun the spares' making."""
    record = served.timed if measured else (lambda _name, call: call())
    if paced and served.runtime == "sandbox":
        await spare_ready(served)
    created = (await record("api create", lambda: served.query(CREATE)))["createCapsule"]
    if (created["status"], created["runtime"]) != ("RUNNING", served.runtime.upper()):
        raise RuntimeError(f"{served.runtime}: createCapsule answered {created}")
    for _ in range(execs):
        await record("api exec", lambda: served.query(EXEC, id=created["id"]))
    await record("api destroy", lambda: served.query(DESTROY, id=created["id"]))
    capsule_id = f"bench-{name}"
    if paced and served.runtime == "sandbox":
        await spare_ready(served)
    await record(
        "agent create", lambda: served.agent.CreateCapsule(pb.CreateCapsuleRequest(capsule_id=capsule_id))
    )
    for _ in range(execs):
        await record(
            "agent exec", lambda: served.agent.Exec(pb.ExecRequest(capsule_id=capsule_id, cmd="true"))
        )
    await record("agent destroy", lambda: served.agent.DestroyCapsule(pb.CapsuleRef(capsule_id=capsule_id)))


def p50_p95(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20, method="inclusive")[18]


def report(sandbox: Served, plain: Served, runs: int, execs: int, *, paced: bool) -> None:
    how = "each create with a spare ready" if paced else "creates back to back, outrunning the spares"
    print(f"{runs} runs, {execs} execs of `true` in each capsule, {how}; milliseconds, p50 and p95")
    print(f"{'':28}{'sandbox p50':>12}{'p95':>8}{'plain p50':>11}{'p95':>8}{'ratio':>8}  target")
    rows = [
        ("api create", "createCapsule to RUNNING"),
        ("api exec", "exec true (API)"),
        ("api destroy", "destroyCapsule"),
        ("agent create", "agent CreateCapsule"),
        ("agent exec", "agent Exec true"),
        ("agent destroy", "agent DestroyCapsule"),
    ]
    for name, label in rows:
        s50, s95 = p50_p95(sandbox.times[name])
        n50, n95 = p50_p95(plain.times[name])
        ratio = s50 / n50
        target = ""
        if name == "api create" and paced:
            met = "met" if s95 <= READY_TARGET_MS else "MISSED"
            target = f"<= {READY_TARGET_MS:.0f} ms: {met} (p95)"
        elif name.endswith("exec"):
            target = f"<= {EXEC_TARGET_RATIO}x plain: {'met' if ratio <= EXEC_TARGET_RATIO else 'MISSED'}"
        print(f"{label:28}{s50:12.1f}{s95:8.1f}{n50:11.1f}{n95:8.1f}{ratio:7.2f}x  {target}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="capsules per runtime and layer")
    parser.add_argument("--execs", type=int, default=5, help="exec round trips per capsule")
    options = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the plain runtime's warning at every start, among others
    with tempfile.TemporaryDirectory() as directory:
        runtime, missing = await SandboxRuntime.probe(Settings(data_dir=Path(directory) / "probe"))
        if runtime is None:
            sys.exit(f"the sandbox runtime does not work here: {missing}")
        async with (
            serve("sandbox", Path(directory) / "sandbox") as sandbox,
            serve("plain", Path(directory) / "plain") as plain,
        ):
            for served in (sandbox, plain):  # imports, connections and caches warm, not measured
                await one_run(served, "warm", options.execs, measured=False, paced=True)
            for paced in (True, False):
                for served in (sandbox, plain):
                    served.times.clear()
                for index in range(options.runs):
                    for served in (sandbox, plain) if index % 2 == 0 else (plain, sandbox):
                        await one_run(served, f"{paced}-{index}", options.execs, measured=True, paced=paced)
                report(sandbox, plain, options.runs, options.execs, paced=paced)
                print()


if __name__ == "__main__":
    asyncio.run(main())

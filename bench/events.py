"""Lifecycle events from startProcess on one replica to a processEvents subscriber of the other.

Run by hand: .venv/bin/python -m bench.events [--bus redis|postgres|both] [--processes N] [--concurrency C]

Starts, as processes of their own, one host agent (`capsule agent`, plain runtime) and two API
replicas (`capsule serve`), all three logging warnings only (at INFO the agent's line per start and
per exit cost it some 14 % of its CPU), on a fresh PostgreSQL database of the machine's server, with
the bus on the machine's Redis or on that PostgreSQL. The suite's Node load client (bench/node/load.mjs, mode
`events`) calls startProcess (`true`, which exits at once) on the first replica over HTTP, C calls
at once, N in all; its one subscriber of the second replica, on graphql-transport-ws, waits for each
process's STARTED and EXITED. Printed per bus:
  events/s  every STARTED and EXITED, over the time from the first startProcess sent to the last
            event delivered
  delay     from the moment an event happened (its `at`: the agent's start or exit time) to its
            delivery on the other replica, p50 and p99, over every event
Targets: 500 events/s or more, p99 50 ms or less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx

from bench.harness import ensure_node_modules, run_load

ROOT = Path(__file__).resolve().parent.parent
CAPSULE = str(ROOT / ".venv" / "bin" / "capsule")
ADMIN_URL = os.environ.get("CAPSULE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CAPSULE_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
START = (
    "mutation($capsuleId: ID!, $tag: String!) "
    '{ startProcess(capsuleId: $capsuleId, input: {cmd: "true", tag: $tag}) { pid } }'
)
EVENTS = "subscription($capsuleId: ID!) { processEvents(capsuleId: $capsuleId) { kind at process { tag } } }"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Figures:
    bus: str
    events: int
    seconds: float
    delays_ms: list[float]

    def line(self) -> str:
        return (
            f"{self.bus:9} {self.events / self.seconds:8.0f} events/s   "
            f"delay p50 {percentile(self.delays_ms, 0.5):6.1f} ms   "
            f"p99 {percentile(self.delays_ms, 0.99):6.1f} ms   "
            f"({self.events} events in {self.seconds:.2f} s)"
        )


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.send_signal(signal.SIGINT)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


async def wait_until_up(url: str) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(60):
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)


async def run(bus: str, *, count: int, concurrency: int, work: Path) -> Figures:
    database = f"capsule_bench_events_{os.getpid()}_{bus}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
    await admin.execute(f'CREATE DATABASE "{database}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")} | {
        "CAPSULE_DATABASE_URL": f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{database}",
        "CAPSULE_BUS_URL": REDIS_URL if bus == "redis" else f"{base}/{database}",
        "CAPSULE_RUNTIME": "plain",
        "CAPSULE_TEAM_REQUESTS_PER_SEC": "0",
        "CAPSULE_MAX_PROCESSES_PER_CAPSULE": str(count + 10),
        "CAPSULE_DEFAULT_MAX_PROCESSES": str(count + 10),
    }
    agent_port, ports = free_port(), (free_port(), free_port())
    try:
        with processes() as started:
            agent_env = env | {"CAPSULE_DATA_DIR": str(work / f"{bus}-agent")}
            started.append(
                subprocess.Popen(
                    [CAPSULE, "--log-level", "WARNING", "agent", "--listen", f"127.0.0.1:{agent_port}"],
                    env=agent_env,
                )
            )
            served = env | {"CAPSULE_HOSTS": f"h1=127.0.0.1:{agent_port}"}
            key = subprocess.run(
                [CAPSULE, "keys", "create", "--team", "bench"],
                env=served | {"CAPSULE_DATA_DIR": str(work / f"{bus}-keys")},
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            for index, port in enumerate(ports):
                data_dir = str(work / f"{bus}-replica-{index}")
                started.append(
                    subprocess.Popen(
                        [CAPSULE, "--log-level", "WARNING", "serve", "--port", str(port)],
                        env=served | {"CAPSULE_DATA_DIR": data_dir},
                        stdout=subprocess.DEVNULL,
                    )
                )
            for port in ports:
                await wait_until_up(f"http://127.0.0.1:{port}/healthz")
            return await measure(bus, key, ports, count=count, concurrency=concurrency)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def measure(bus: str, key: str, ports: tuple[int, int], *, count: int, concurrency: int) -> Figures:
    first = f"http://127.0.0.1:{ports[0]}/graphql"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        created = await client.post(first, json={"query": "mutation { createCapsule { id } }"})
        capsule_id = created.json()["data"]["createCapsule"]["id"]
    result = await run_load(
        "events",
        url=first,
        wsUrl=f"ws://127.0.0.1:{ports[1]}/graphql",
        key=key,
        startQuery=START,
        eventsQuery=EVENTS,
        capsuleId=capsule_id,
        count=count,
        concurrency=concurrency,
        timeoutSec=120,
    )
    by_kind: dict[str, list[float]] = result["delaysMs"]
    for kind, values in by_kind.items():
        print(f"  {bus} {kind}: p50 {percentile(values, 0.5):.1f} ms p99 {percentile(values, 0.99):.1f} ms")
    delays = [delay for values in by_kind.values() for delay in values]
    return Figures(bus=bus, events=int(result["events"]), seconds=float(result["seconds"]), delays_ms=delays)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bus", choices=["redis", "postgres", "both"], default="both")
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    buses = ["redis", "postgres"] if args.bus == "both" else [args.bus]
    ensure_node_modules()
    with tempfile.TemporaryDirectory(prefix="bench-events-") as directory:
        figures = [
            await run(bus, count=args.processes, concurrency=args.concurrency, work=Path(directory))
            for bus in buses
        ]
    print(
        f"processEvents, startProcess on one replica -> subscriber on the other ({args.processes} processes)"
    )
    for figure in figures:
        print(figure.line())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

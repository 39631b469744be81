"""Bytes/s of processOutput through the whole API, beside a raw pipe and a bare Strawberry subscription.

Run by hand: .venv/bin/python -m bench.api_stream [--mib N] [--subscribers K]
One process holds the API server (uvicorn, SQLite, memory bus) and its embedded agent; the client
speaks graphql-transport-ws over loopback with `websockets`, as a log viewer would. The peer is a
bare Strawberry subscription that yields chunks of the same size from memory, served the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import strawberry
import uvicorn
import websockets
from strawberry.asgi import GraphQL

from app.config import Settings
from app.main import create_app
from app.store.migrate import upgrade

# The same writers and raw-pipe reader as bench/agent_stream.py.
from bench.agent_stream import BLOCK_WRITER, LINE_WRITER, Case, raw_pipe

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
OUTPUT = (ROOT / "graphql" / "ProcessOutput.graphql").read_text()


async def serve(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws_max_size=64 * MiB)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def read_subscription(url: str, key: str, query: str, variables: dict[str, Any], field: str) -> int:
    """Bytes of `data` received until the subscription completes."""
    total = 0
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"], max_size=64 * MiB) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}})
        )
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "complete":
                return total
            if message["type"] == "error":
                raise RuntimeError(message)
            if message["type"] == "next":
                event = message["payload"]["data"][field]
                total += len(event.get("data") or "")
    return total


@strawberry.type
class Query:
    ok: bool = True


@strawberry.type
class Chunk:
    seq: int
    data: str


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def chunks(self, size: int, count: int) -> AsyncGenerator[Chunk, None]:
        data = "x" * size
        for seq in range(count):
            yield Chunk(seq=seq, data=data)


BARE = strawberry.Schema(query=Query, subscription=Subscription)


async def api_case(url: str, key: str, capsule_id: str, writer: str, size: int, subscribers: int) -> float:
    import httpx

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        start = "mutation($c: ID!, $i: StartProcessInput!) { startProcess(capsuleId: $c, input: $i) { tag } }"
        body = {
            "query": start,
            "variables": {
                "c": capsule_id,
                "i": {
                    "cmd": sys.executable,
                    "args": ["-c", f"import sys; sys.stdin.read(); exec({writer!r})", str(size)],
                    "stdin": True,
                },
            },
        }
        tag = (await http.post(url.replace("ws://", "http://"), json=body)).json()["data"]["startProcess"][
            "tag"
        ]
        variables = {"capsuleId": capsule_id, "selector": tag, "fromSeq": 0}
        readers = [
            asyncio.create_task(read_subscription(url, key, OUTPUT, variables, "processOutput"))
            for _ in range(subscribers)
        ]
        await asyncio.sleep(0.3)  # let every subscriber attach before the writer starts
        began = time.perf_counter()
        close = "mutation($c: ID!, $s: String!) { closeInput(capsuleId: $c, selector: $s) }"
        await http.post(
            url.replace("ws://", "http://"), json={"query": close, "variables": {"c": capsule_id, "s": tag}}
        )
        totals = await asyncio.gather(*readers)
    assert min(totals) >= size * 0.9, totals
    return totals[0] / (time.perf_counter() - began)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--runtime", choices=("auto", "sandbox", "plain"), default="auto")
    args = parser.parse_args()
    size = args.mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), output_cap_bytes=256 * MiB, exec_default_timeout_sec=600, runtime=args.runtime
        )
        await asyncio.to_thread(upgrade, settings.database_url)
        app = create_app(settings)
        server, task, port = await serve(app)
        key = (await app.state.capsule.platform.keys.create_key("bench"))[1]
        url = f"ws://127.0.0.1:{port}/graphql"
        import httpx

        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
            created = await http.post(
                url.replace("ws://", "http://"), json={"query": "mutation { createCapsule { id } }"}
            )
        capsule_id = created.json()["data"]["createCapsule"]["id"]

        chunk = 64 * 1024
        bare = GraphQL(BARE)
        bare_server, bare_task, bare_port = await serve(bare)
        began = time.perf_counter()
        got = await read_subscription(
            f"ws://127.0.0.1:{bare_port}/graphql",
            key,
            "subscription($s: Int!, $n: Int!) { chunks(size: $s, count: $n) { seq data } }",
            {"s": chunk, "n": size // chunk},
            "chunks",
        )
        bare_rate = got / (time.perf_counter() - began)

        print(
            f"{args.mib} MiB of 64 KiB writes, a quarter of that in lines; {args.subscribers} subscriber(s)"
        )
        print(
            f"{'case':<16}{'raw pipe MiB/s':>16}{'API MiB/s':>12}{'API/raw':>10}{'bare Strawberry MiB/s':>24}"
        )
        for case in (Case("64 KiB writes", BLOCK_WRITER, size), Case("line flood", LINE_WRITER, size // 4)):
            received, seconds = raw_pipe(case)
            raw = received / seconds
            api = await api_case(url, key, capsule_id, case.script, case.total_bytes, args.subscribers)
            rates = f"{raw / MiB:>16.1f}{api / MiB:>12.1f}{api / raw:>10.2f}{bare_rate / MiB:>24.1f}"
            print(f"{case.name:<16}{rates}")
        for running in (server, bare_server):
            running.should_exit = True
        await asyncio.gather(task, bare_task)


if __name__ == "__main__":
    asyncio.run(main())

"""The benchmarks of the suite: each runs ours and its peer in the same run and returns its figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from bench import writers
from bench.harness import (
    MB,
    LoadClient,
    MiB,
    RssSampler,
    Serve,
    agent_process,
    document,
    load_client,
    node_peer,
    postgres_database,
    rss_bytes,
    run_load,
    serving,
    strawberry_peer,
    supervisors_private,
    supervisors_rss,
    websocketd,
)

KiB = 1024
TIMES = "\N{MULTIPLICATION SIGN}"
OUTPUT = document("ProcessOutput")
SEQ = shutil.which("seq") or "/usr/bin/seq"


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark moves: the full run's, or --quick's smoke sizes."""

    bulk_bytes: int
    flood_lines: int
    delay_rate: float
    delay_lines: int
    fanout: tuple[int, int]
    fanout_rate: float
    fanout_lines: int
    idle: int
    execs: int
    starts: int
    unwatched_bytes: int
    connect_timeout_sec: float
    drain_sec: float  # how long after its writer ends a fan-out run may wait for the last lines


FULL = Sizes(
    bulk_bytes=256 * MiB,
    flood_lines=400_000,
    delay_rate=200,
    delay_lines=2000,
    fanout=(1000, 5000),
    fanout_rate=2,
    fanout_lines=20,
    idle=2000,
    execs=200,
    starts=400,
    unwatched_bytes=1024 * MiB,
    connect_timeout_sec=180,
    drain_sec=90,
)
QUICK = Sizes(
    bulk_bytes=32 * MiB,
    flood_lines=100_000,
    delay_rate=200,
    delay_lines=300,
    fanout=(50, 200),
    fanout_rate=5,
    fanout_lines=10,
    idle=100,
    execs=30,
    starts=60,
    unwatched_bytes=256 * MiB,
    connect_timeout_sec=60,
    drain_sec=30,
)


@dataclass
class Figure:
    """One row of the table: ours beside the peer's, the target, and how it was measured."""

    name: str
    unit: str
    ours: float | None
    peer: float | None
    target: str
    met: bool | None
    method: str
    detail: str = ""
    digits: int = 1

    def cell(self, value: float | None) -> str:
        return "—" if value is None else f"{value:,.{self.digits}f} {self.unit}"

    @property
    def ratio(self) -> str:
        if self.ours is None or self.peer is None or self.peer == 0:
            return "—"
        return f"{self.ours / self.peer:.2f}{TIMES}"

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "—"}[self.met]


@dataclass
class Context:
    runtime: str | None  # CAPSULE_RUNTIME for the servers; None: the server's auto
    sizes: Sizes
    runtimes_seen: set[str] = field(default_factory=set)
    exits: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _stream: tuple[Serve, str] | None = None

    async def stream_server(self) -> tuple[Serve, str]:
        """The server (and a capsule on it) that bulk, flood and delay share, started on first use and
        stopped when the run ends: its output cap holds a whole bulk run, so every byte arrives."""
        if self._stream is None:
            env = {"CAPSULE_OUTPUT_CAP_BYTES": str(2 * self.sizes.bulk_bytes)}
            serve = await self.exits.enter_async_context(serving(self.runtime, env=env, name="stream"))
            self._stream = serve, await _capsule(serve, self)
        return self._stream

    async def release_stream(self) -> None:
        """Stops the shared stream server, if one runs."""
        await self.exits.aclose()
        self._stream, self.exits = None, contextlib.AsyncExitStack()


class BenchError(RuntimeError):
    """A benchmark could not measure what it is for."""


def checked(result: dict[str, Any], what: str) -> dict[str, Any]:
    if result.get("errorCount"):
        raise BenchError(f"{what}: {result['errorCount']} errors, e.g. {result['errors']}")
    if result.get("timedOut"):
        raise BenchError(f"{what}: {result['completed']} of {result['subscribers']} done before the deadline")
    return result


async def _capsule(serve: Serve, ctx: Context) -> str:
    capsule = await serve.create_capsule()
    ctx.runtimes_seen.add(str(capsule["runtime"]).lower())
    return str(capsule["id"])


async def follow_ours(
    serve: Serve,
    capsule_id: str,
    tag: str,
    *,
    count: int,
    within: float,
    drain: float = 600,
    stamps: bool = False,
) -> LoadClient:
    """count subscribers of the gated process, opened at once; once all are live (or timeout
    passes) its stdin is closed, and the writer goes."""
    variables = {"capsuleId": capsule_id, "selector": tag, "fromSeq": 0}
    client = await load_client(
        "subscribe",
        url=serve.ws_url,
        count=count,
        key=serve.key,
        query=OUTPUT,
        variables=variables,
        stamps=stamps,
        connectSec=within,
        drainSec=drain,
    )
    await client.wait_live(within)
    await client.go()
    try:
        await serve.close_input(capsule_id, tag)
    except RuntimeError as exc:  # the client then ends at its deadline, with what arrived
        client.note = f"closeInput failed: {exc}"
    return client


async def follow_node(
    ws_url: str, close_url: str, *, count: int, within: float, drain: float = 600, stamps: bool = False
) -> LoadClient:
    variables = {"capsuleId": "peer", "selector": "peer", "fromSeq": 0}
    client = await load_client(
        "subscribe",
        url=ws_url,
        count=count,
        key="peer",
        query=OUTPUT,
        variables=variables,
        stamps=stamps,
        connectSec=within,
        drainSec=drain,
    )
    await client.wait_live(within)
    await client.go()
    async with httpx.AsyncClient() as http:
        (await http.post(close_url)).raise_for_status()
    return client


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


def per_sec(amount: float, result: dict[str, Any]) -> float:
    return float(amount / (result["spanMs"] / 1000))


# The benchmarks.


async def bulk(ctx: Context) -> list[Figure]:
    size = ctx.sizes.bulk_bytes
    serve, capsule_id = await ctx.stream_server()
    tag = await serve.start(capsule_id, writers.gated(writers.python(writers.BLOCKS, size)), stdin=True)
    client = await follow_ours(serve, capsule_id, tag, count=1, within=60)
    ours = checked(await client.finish(), "bulk, ours")
    with strawberry_peer(size // 65536, 65536) as url:
        variables = {"capsuleId": "peer", "selector": "peer", "fromSeq": 0}
        peer = checked(
            await run_load("subscribe", url=url, count=1, key="-", query=OUTPUT, variables=variables),
            "bulk, bare Strawberry",
        )
    if ours["bytesMin"] < size:
        raise BenchError(f"bulk: ours delivered {ours['bytesMin']} of {size} bytes")
    mine, theirs = per_sec(ours["bytesMin"], ours) / MB, per_sec(peer["bytesMin"], peer) / MB
    return [
        Figure(
            "bulk output, 64 KiB writes (vs bare Strawberry)",
            "MB/s",
            mine,
            theirs,
            f"≥ 2{TIMES} the bare Strawberry subscription",
            mine >= 2 * theirs,
            f"A process writes {size // MiB} MiB of `x` in 64 KiB writes once its one subscriber is "
            "live (ProcessOutput.graphql over graphql-transport-ws, the Node `ws` client); MB/s from "
            "the moment its stdin is closed (the writer goes) to ProcessExited. The output cap holds "
            "the whole run, so every byte arrives. Peer: a bare Strawberry subscription on uvicorn "
            "yielding as many 64 KiB chunks of the same bytes from memory, through the same document "
            "and client; from its first event to the last.",
            f"ours {ours['messages']} messages; peer {peer['messages']}",
        )
    ]


async def flood(ctx: Context) -> list[Figure]:
    lines = ctx.sizes.flood_lines
    serve, capsule_id = await ctx.stream_server()
    tag = await serve.start(capsule_id, writers.gated([SEQ, "1", str(lines)]), stdin=True)
    client = await follow_ours(serve, capsule_id, tag, count=1, within=60)
    ours = checked(await client.finish(), "flood, ours")
    with websocketd([SEQ, "1", str(lines)]) as url:
        peer = checked(await run_load("subscribe", url=url, count=1, raw=True), "flood, websocketd")
    if ours["linesMin"] != lines or peer["linesMin"] != lines:
        raise BenchError(f"flood: {ours['linesMin']} and {peer['linesMin']} lines of {lines}")
    mine, theirs = per_sec(lines, ours) / 1000, per_sec(lines, peer) / 1000
    return [
        Figure(
            f"short-line flood, `seq 1 {lines}` (vs websocketd line mode)",
            "k lines/s",
            mine,
            theirs,
            f"≥ 60{TIMES} websocketd line mode",
            mine >= 60 * theirs,
            f"`seq 1 {lines}` starts once its one subscriber is live; lines per second from the "
            "moment its stdin is closed to ProcessExited. Peer: websocketd (line mode: a message per "
            "line) running the same `seq` for the same Node client; from the socket's open "
            "(websocketd starts the command then) to its close.",
            f"ours {ours['messages']} messages for {lines} lines",
        )
    ]


async def delay(ctx: Context) -> list[Figure]:
    rate, lines = ctx.sizes.delay_rate, ctx.sizes.delay_lines
    stamps = writers.python(writers.STAMPS, rate, lines)
    serve, capsule_id = await ctx.stream_server()
    tag = await serve.start(capsule_id, writers.gated(stamps), stdin=True)
    client = await follow_ours(serve, capsule_id, tag, count=1, within=60, stamps=True)
    ours = checked(await client.finish(), "delay, ours")["delayMs"]
    with websocketd(stamps) as url:
        peer = checked(
            await run_load("subscribe", url=url, count=1, raw=True, stamps=True), "delay, websocketd"
        )
    peer = peer["delayMs"]
    method = (
        f"A process writes {lines} lines at {rate:g} lines/s, each the CLOCK_MONOTONIC time of its "
        "write(2); the Node client subtracts it from its own CLOCK_MONOTONIC (process.hrtime) as each "
        "message arrives. Peer: websocketd in line mode running the same writer, the same client."
    )
    return [
        Figure(
            "write → client delay, 1 subscriber, p50 (vs websocketd)",
            "ms",
            ours["p50"],
            peer["p50"],
            "(reported beside p99)",
            None,
            method,
            f"{ours['count']} and {peer['count']} lines",
            digits=2,
        ),
        Figure(
            "write → client delay, 1 subscriber, p99 (vs websocketd)",
            "ms",
            ours["p99"],
            peer["p99"],
            f"p99 ≤ 2 ms and ≤ 1.5{TIMES} websocketd's p99",
            ours["p99"] <= 2 and ours["p99"] <= 1.5 * peer["p99"],
            method,
            f"max: ours {ours['max']:.1f} ms, websocketd {peer['max']:.1f} ms",
            digits=2,
        ),
    ]


async def _fanout(ctx: Context, count: int, *, large: bool) -> list[Figure]:
    rate, lines, timeout = ctx.sizes.fanout_rate, ctx.sizes.fanout_lines, ctx.sizes.connect_timeout_sec
    stamps = writers.python(writers.STAMPS, rate, lines)
    drain = lines / rate + ctx.sizes.drain_sec
    async with serving(ctx.runtime, name=f"fanout-{count}") as serve:
        capsule_id = await _capsule(serve, ctx)
        tag = await serve.start(capsule_id, writers.gated(stamps), stdin=True)
        async with RssSampler(lambda: rss_bytes(serve.pid)) as ours_rss:
            client_ours = await follow_ours(
                serve, capsule_id, tag, count=count, within=timeout, drain=drain, stamps=True
            )
            ours = await client_ours.finish()
        supervisors, how_many = supervisors_rss(serve.pid)
    with node_peer(writers.gated(stamps)) as (process, ws_url, close_url):
        async with RssSampler(lambda: rss_bytes(process.pid)) as peer_rss:
            client = await follow_node(
                ws_url, close_url, count=count, within=timeout, drain=drain, stamps=True
            )
            peer = await client.finish()
    checked(peer, f"{count} subscribers, Node peer")
    figures = []
    done = f"{ours['completed']} of {count} subscribers got every line" + (
        f", {ours['dropped']} were dropped ({ours['errorCount']} errors, e.g. {ours['errors'][0]})"
        if ours["errorCount"]
        else ""
    )
    if client_ours.note:
        done += f"; {client_ours.note}"
    method = (
        f"{count} WebSockets opened at once by one Node `ws` client, each subscribing to one process "
        f"(ProcessOutput.graphql); once all are live the process writes {lines} timestamped lines at "
        f"{rate:g}/s; delay as for one subscriber, over every line of every subscriber. Peer: a Node "
        "graphql-ws server (graphql-js, ws) running the same writer and fanning its output out to the "
        "same subscribers, same document, same client. A run that has not delivered every line "
        f"{ctx.sizes.drain_sec:.0f} s after its writer ends with what arrived."
    )
    mine, theirs = ours["delayMs"]["p99"], peer["delayMs"]["p99"]
    figures.append(
        Figure(
            f"{count} subscribers of one process, delay p99 (vs Node graphql-ws)",
            "ms",
            mine,
            theirs,
            "p99 ≤ the Node graphql-ws peer's p99",
            None if mine is None else mine <= theirs and ours["completed"] == count,
            method,
            f"{done}; p50 ours {_ms(ours['delayMs']['p50'])}, peer {_ms(peer['delayMs']['p50'])}",
        )
    )
    mine_mb, theirs_mb = ours_rss.peak / MB, peer_rss.peak / MB
    met = mine_mb <= theirs_mb and (not large or mine_mb <= 250)
    figures.append(
        Figure(
            f"{count} subscribers, server RSS (vs Node graphql-ws)",
            "MB",
            mine_mb,
            theirs_mb,
            "≤ the Node peer's" + (", and ≤ 250 MB" if large else ""),
            met,
            "Peak RSS sampled every 0.1 s over the same run: ours, the `capsule serve` process with its "
            "in-process agent; the peer, its node process (neither counts the writer).",
            (
                f"sandbox supervisors besides: {how_many} processes, {supervisors / MB:.0f} MB"
                if how_many
                else "no sandbox supervisors (plain runtime)"
            )
            + (f"; ours had {ours['live']} of {count} live" if ours["live"] < count else ""),
            digits=0,
        )
    )
    if large:
        mine_s = None if ours["allLiveMs"] is None else ours["allLiveMs"] / 1000
        theirs_s = peer["allLiveMs"] / 1000
        figures.append(
            Figure(
                f"{count} subscribers connecting at once, all live (vs Node graphql-ws)",
                "s",
                mine_s,
                theirs_s,
                "all live in ≤ the Node peer's time",
                mine_s is not None and mine_s <= theirs_s,
                f"From the first of {count} WebSockets opened at once to the last one's first event "
                "(connection_init, subscribe, replay of the writer's first line), in the run above.",
                f"{ours['live']} of {count} live within {timeout:.0f} s, {ours['dropped']} dropped"
                if mine_s is None
                else "",
                digits=2,
            )
        )
    return figures


async def fanout(ctx: Context) -> list[Figure]:
    return await _fanout(ctx, ctx.sizes.fanout[0], large=False)


async def connect(ctx: Context) -> list[Figure]:
    return await _fanout(ctx, ctx.sizes.fanout[1], large=True)


async def _idle_growth(
    pid: int, subscribe: Callable[[int], Awaitable[LoadClient]], count: int, within: float
) -> tuple[float, float, int]:
    """RSS added per live subscription (bytes) by count idle ones opened at once, after 10 warm-up
    ones came and went; the RSS at the start; how many were live (the others were dropped)."""
    warm = await subscribe(10)
    await warm.wait_live(60)
    warm.process.terminate()
    await warm.process.wait()
    await asyncio.sleep(1)
    before = rss_bytes(pid)
    client = await subscribe(count)
    try:
        if not await client.wait_live(within) or not client.live_count:
            result = client.result or {}
            raise BenchError(
                f"idle: {client.live_count or result.get('live', 0)} of {count} subscriptions live within "
                f"{within:.0f} s; {result.get('dropped', '?')} dropped, e.g. {result.get('errors', [])[:1]}"
            )
        await asyncio.sleep(2)  # settle
        after = rss_bytes(pid)
    finally:
        client.process.terminate()
        await client.process.wait()
    return (after - before) / client.live_count, before, client.live_count


async def idle(ctx: Context) -> list[Figure]:
    count, timeout = ctx.sizes.idle, ctx.sizes.connect_timeout_sec
    waiter = writers.gated(["true"])
    async with serving(ctx.runtime, name="idle") as serve:
        capsule_id = await _capsule(serve, ctx)
        tag = await serve.start(capsule_id, waiter, stdin=True)
        variables = {"capsuleId": capsule_id, "selector": tag, "fromSeq": 0}

        def ours_subscribe(n: int) -> Awaitable[LoadClient]:
            return load_client(
                "subscribe", url=serve.ws_url, count=n, key=serve.key, query=OUTPUT, variables=variables,
                drainSec=3600,
            )  # fmt: skip

        ours, ours_base, ours_live = await _idle_growth(serve.pid, ours_subscribe, count, timeout)
        await serve.close_input(capsule_id, tag)
    with node_peer(waiter) as (process, ws_url, _close):

        def peer_subscribe(n: int) -> Awaitable[LoadClient]:
            variables = {"capsuleId": "peer", "selector": "peer", "fromSeq": 0}
            return load_client(
                "subscribe", url=ws_url, count=n, key="peer", query=OUTPUT, variables=variables,
                drainSec=3600,
            )  # fmt: skip

        peer, peer_base, peer_live = await _idle_growth(process.pid, peer_subscribe, count, timeout)
    return [
        Figure(
            f"{count} idle subscriptions, RSS added per subscription (vs Node graphql-ws)",
            "KiB",
            ours / KiB,
            peer / KiB,
            "≤ the Node peer's per subscription",
            ours <= peer and ours_live == count,
            f"RSS of the server process before and 2 s after {count} subscriptions (a WebSocket each, "
            "from one Node `ws` client, at once) are live on a process that prints one line and waits; "
            "10 subscriptions came and went before, so first-use costs are not counted. Peer: the Node "
            "graphql-ws server, the same way.",
            f"RSS before: ours {ours_base / MB:.0f} MB, peer {peer_base / MB:.0f} MB"
            + (
                f"; live: ours {ours_live} of {count}, peer {peer_live}"
                if min(ours_live, peer_live) < count
                else ""
            ),
            digits=0,
        )
    ]


async def exec_true(ctx: Context) -> list[Figure]:
    count = ctx.sizes.execs
    exec_doc = document("Exec")
    figures = []
    bare = await bare_spawn(count)
    for runtime in ("sandbox", "plain"):
        name = f"`exec true` round trip through the API, {runtime} (vs bare asyncio spawn)"
        method = (
            f"{count} `exec` mutations of `true` (Exec.graphql over HTTP, one after another, from the Node "
            "client with keep-alive; 5 before them unmeasured) on one `capsule serve` per runtime "
            "(CAPSULE_RUNTIME=sandbox, once its spare sandboxes are up, and plain); p50. Peer: "
            f"asyncio.create_subprocess_exec('true') and wait, {count} times in the suite's process; p50."
        )
        try:
            async with serving(runtime, name=f"exec-{runtime}") as serve:
                capsule_id = await _capsule(serve, ctx)
                if runtime == "sandbox":
                    await _spares_ready(serve)
                variables = {"capsuleId": capsule_id, "input": {"cmd": "true"}}
                result = await run_load(
                    "exec", url=serve.url, key=serve.key, query=exec_doc, variables=variables, count=count
                )
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:200]
            figures.append(
                Figure(name, "ms", None, bare, f"≤ 3{TIMES} a bare asyncio spawn", None, method, reason)
            )
            continue
        ms = result["ms"]
        figures.append(
            Figure(
                name,
                "ms",
                ms["p50"],
                bare,
                f"≤ 3{TIMES} a bare asyncio spawn of `true`",
                ms["p50"] <= 3 * bare,
                method,
                f"p99 {ms['p99']:.1f} ms",
                digits=2,
            )
        )
    return figures


async def _spares_ready(serve: Serve, within: float = 60.0) -> None:
    """Returns once the sandbox agent's spare sandboxes are up: one starting meanwhile (the capsule
    just made took one) would take a core from what is measured."""
    spares = serve.data_dir / "agent" / "spares"
    wanted = int(os.environ.get("CAPSULE_SANDBOX_SPARES", "2"))

    def ready() -> int:
        return (
            sum(1 for d in spares.glob("*") if (d / "run" / "agent.sock").exists()) if spares.exists() else 0
        )

    async with asyncio.timeout(within):
        while ready() < wanted:
            await asyncio.sleep(0.05)


async def bare_spawn(count: int) -> float:
    """p50 ms of an asyncio spawn of `true` and its wait."""
    times = []
    for index in range(count + 5):
        began = time.perf_counter()
        process = await asyncio.create_subprocess_exec("true")
        await process.wait()
        if index >= 5:
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


async def starts(ctx: Context) -> list[Figure]:
    count, figures = ctx.sizes.starts, []
    for database in ("SQLite", "PostgreSQL"):
        async with postgres_database() if database == "PostgreSQL" else _no_database() as url:
            env = {"CAPSULE_DATABASE_URL": url} if url else {}
            async with serving(ctx.runtime, env=env, name=f"starts-{database.lower()}") as serve:
                capsule_id = await _capsule(serve, ctx)
                result = await run_load(
                    "starts",
                    url=serve.url,
                    wsUrl=serve.ws_url,
                    key=serve.key,
                    startQuery=document("StartProcess"),
                    eventsQuery=document("ProcessEvents"),
                    capsuleId=capsule_id,
                    count=count,
                    concurrency=20,
                    timeoutSec=600,
                )
        rate = result["recordedPerSec"]
        figures.append(
            Figure(
                f"`startProcess` + exit recorded, 20 at once, {database}",
                "/s",
                rate,
                None,
                "≥ 300/s",
                rate >= 300 and result["recorded"] == count,
                f"{count} startProcess mutations of `true` (StartProcess.graphql), 20 in flight at once "
                "from the Node client, until a processEvents subscription (published once the exit is in "
                f"the store) has seen every one's EXITED; on a `capsule serve` on {database} "
                "(PostgreSQL: a fresh database at 127.0.0.1:5432, dropped after). No peer: the target.",
                f"{result['recorded']} of {count} recorded; the starts alone {result['startsPerSec']:.0f}/s",
                digits=0,
            )
        )
    return figures


class _no_database:
    async def __aenter__(self) -> str:
        return ""

    async def __aexit__(self, *_: object) -> None:
        return None


async def _result_line(serve: Serve, capsule_id: str, tag: str) -> str:
    """The RESULT line the timed writer printed on stderr, from its retained output."""
    url, stderr = serve.ws_url, ""
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"], max_size=64 * MiB) as ws:  # type: ignore[list-item]
        await ws.send(
            json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {serve.key}"}})
        )
        json.loads(await ws.recv())
        variables = {"capsuleId": capsule_id, "selector": tag, "fromSeq": 0}
        payload = {"query": OUTPUT, "variables": variables}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        async with asyncio.timeout(60):
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] != "next":
                    break
                event = message["payload"]["data"]["processOutput"]
                if event.get("stream") == "STDERR":
                    stderr += event["data"]
                if event["__typename"] == "ProcessExited":
                    break
    for line in stderr.splitlines():
        if line.startswith("RESULT "):
            return line
    raise BenchError(f"the writer printed no RESULT line: {stderr[-300:]!r}")


def _local_writer(total: int, *, pipe: bool) -> str:
    """The timed writer into /dev/null, or into a pipe read 64 KiB at a time here: its RESULT line."""
    argv = writers.python(writers.TIMED_BLOCKS, total)
    out = subprocess.PIPE if pipe else subprocess.DEVNULL
    with subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE) as process:
        if pipe:
            assert process.stdout is not None
            while process.stdout.read1(65536):  # type: ignore[attr-defined]
                pass
        assert process.stderr is not None
        text = process.stderr.read().decode()
    return next(line for line in text.splitlines() if line.startswith("RESULT "))


async def unwatched(ctx: Context) -> list[Figure]:
    total = ctx.sizes.unwatched_bytes
    cap = 16 * MiB  # CAPSULE_OUTPUT_CAP_BYTES's default
    limit = 2 * cap + 50 * MB
    with tempfile.TemporaryDirectory(prefix="capsule-bench-unwatched-") as tmp:
        # No spare sandboxes (the agent makes them): its tree is then the agent and this capsule's
        # supervisor alone.
        spares = {"CAPSULE_SANDBOX_SPARES": "0"}
        with agent_process(ctx.runtime, Path(tmp), env=spares) as (agent, address):
            async with serving(ctx.runtime, env={"CAPSULE_HOSTS": f"bench={address}"}) as serve:
                capsule_id = await _capsule(serve, ctx)
                base = rss_bytes(agent.pid)

                def tree() -> int:
                    # Every page of the tree once: a supervisor maps the same interpreter and
                    # libraries as the agent, which an RSS of each would count twice.
                    return rss_bytes(agent.pid) + supervisors_private(agent.pid)

                def rss_sum() -> int:
                    return rss_bytes(agent.pid) + supervisors_rss(agent.pid)[0]

                async with (
                    RssSampler(tree, interval=0.02) as sampler,
                    RssSampler(rss_sum, interval=0.02) as summed,
                    RssSampler(lambda: rss_bytes(agent.pid), interval=0.02) as agent_alone,
                ):
                    tag = await serve.start(capsule_id, writers.python(writers.TIMED_BLOCKS, total))
                    await serve.wait_exited(capsule_id, tag)
                supervisors = supervisors_rss(agent.pid)[0]
                result = await _result_line(serve, capsule_id, tag)
    seconds, longest = map(float, result.split()[1:3])
    null_seconds, null_longest = map(
        float, (await asyncio.to_thread(_local_writer, total, pipe=False)).split()[1:3]
    )
    pipe_seconds, pipe_longest = map(
        float, (await asyncio.to_thread(_local_writer, total, pipe=True)).split()[1:3]
    )
    mb = total / MB
    method = (
        f"A process writes {total // MiB} MiB in 64 KiB writes with no subscriber, on a `capsule agent` "
        "of its own (serve reaches it by CAPSULE_HOSTS; no spare sandboxes) with the default 16 MiB "
        "output cap. Agent RSS: the peak, sampled every 20 ms, of the agent process's RSS plus what the "
        "capsule's sandbox supervisor (which keeps the log on the sandbox runtime) holds that no other "
        "process maps (its private pages: the interpreter and libraries it shares with the agent are "
        "counted once, in the agent's RSS). The writer times itself."
    )
    return [
        Figure(
            f"{total // MiB} MiB written, nobody watching: agent RSS (vs 2{TIMES} cap + 50 MB)",
            "MB",
            sampler.peak / MB,
            limit / MB,
            f"agent RSS ≤ 2{TIMES} the log cap + 50 MB",
            sampler.peak <= limit,
            method,
            f"the agent process {base / MB:.0f} MB before, {agent_alone.peak / MB:.0f} MB at most; its "
            f"sandbox supervisor {supervisors / MB:.0f} MB RSS at the end; the two RSS summed (shared "
            f"pages twice) {summed.peak / MB:.0f} MB at most",
            digits=0,
        ),
        Figure(
            f"{total // MiB} MiB written, nobody watching: writer (vs writing to /dev/null)",
            "MB/s",
            mb / seconds,
            mb / null_seconds,
            "writer never blocked (no write(2) over 100 ms)",
            longest <= 0.1,
            method + " Peer: the same writer into /dev/null (and, in the note, into a raw pipe read).",
            f"longest write {longest * 1000:.1f} ms (into /dev/null {null_longest * 1000:.1f} ms); into a "
            f"raw pipe read {mb / pipe_seconds:,.0f} MB/s, longest write {pipe_longest * 1000:.1f} ms",
            digits=0,
        ),
    ]


# The benchmarks that share Context.stream_server.
ON_STREAM_SERVER = frozenset({"bulk", "flood", "delay"})

BENCHMARKS: dict[str, Callable[[Context], Awaitable[list[Figure]]]] = {
    "bulk": bulk,
    "flood": flood,
    "delay": delay,
    "fanout": fanout,
    "connect": connect,
    "idle": idle,
    "exec": exec_true,
    "starts": starts,
    "unwatched": unwatched,
}

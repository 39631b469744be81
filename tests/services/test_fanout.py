"""OutputFanout against a real agent: one agent stream shared, laggards and late joiners served whole."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import pytest

from app.agent.server import start_agent
from app.config import Settings
from app.domain import OutputChunk, OutputEvent, OutputGap, ProcessExit, ProcessSpec
from app.errors import Unavailable
from app.hosts.client import HostClient
from app.hosts.pool import HostPool
from app.services.fanout import OutputFanout, ProcessKey

LINES = 2000
EXPECTED = b"".join(b"line %d\n" % i for i in range(1, LINES + 1))
# Writes in bursts, with pauses, so readers meet it both live and behind.
WRITER = (
    f'i=1; while [ $i -le {LINES} ]; do echo "line $i"; '
    "[ $((i % 200)) -eq 0 ] && sleep 0.05; i=$((i+1)); done"
)


async def read_all(fanout: OutputFanout, key: ProcessKey, from_seq: int = 0, *, pause: float = 0.0) -> bytes:
    """All output from from_seq; pause stalls the reader once, after its first event."""
    data = b""
    async with aclosing(fanout.follow(key, from_seq)) as events:
        async for event in events:
            if isinstance(event, OutputChunk):
                data += event.data
            if pause:
                await asyncio.sleep(pause)  # a stalled reader, on purpose: the writer runs ahead
                pause = 0.0
    return data


async def start(
    client: HostClient, capsule_id: str, script: str, tag: str, *, stdin: bool = False
) -> ProcessKey:
    spec = ProcessSpec(cmd="sh", args=("-c", script), tag=tag, stdin=stdin)
    info = await client.start_process(capsule_id, spec)
    return ProcessKey(host_id="h1", capsule_id=capsule_id, pid=info.pid, tag=info.tag)


async def test_subscribers_share_one_agent_stream(
    pool: HostPool, client: HostClient, capsule_id: str
) -> None:
    fanout = OutputFanout(pool=pool, buffer_bytes=8 * 1024 * 1024)
    key = await start(client, capsule_id, f"read go; {WRITER}", "one-stream", stdin=True)
    async with asyncio.timeout(20):
        readers = [asyncio.create_task(read_all(fanout, key)) for _ in range(3)]
        while fanout.upstreams != 1 or sum(u.subscribers for u in fanout._upstreams.values()) != 3:
            await asyncio.sleep(0.01)
        assert len(fanout._upstreams) == 1
        await client.close_input(capsule_id, "one-stream")
        results = await asyncio.gather(*readers)
    assert results == [EXPECTED] * 3
    assert fanout._upstreams == {}


async def test_a_laggard_and_a_late_joiner_get_everything(
    pool: HostPool, client: HostClient, capsule_id: str
) -> None:
    fanout = OutputFanout(pool=pool, buffer_bytes=512)  # tiny, so readers fall behind it
    key = await start(client, capsule_id, WRITER, "lagged")
    async with asyncio.timeout(30):
        fast = asyncio.create_task(read_all(fanout, key))
        slow = asyncio.create_task(read_all(fanout, key, pause=0.5))
        while not any(u.floor > 0 for u in fanout._upstreams.values()) and not fast.done():
            await asyncio.sleep(0.01)
        late = asyncio.create_task(read_all(fanout, key))  # from 0, older than the shared buffer
        assert await fast == EXPECTED
        assert await slow == EXPECTED
        assert await late == EXPECTED


async def test_resume_from_a_seq_has_no_duplicate_and_no_hole(
    pool: HostPool, client: HostClient, capsule_id: str
) -> None:
    fanout = OutputFanout(pool=pool, buffer_bytes=8 * 1024 * 1024)
    key = await start(client, capsule_id, WRITER, "resumed")
    seen: list[OutputEvent] = []
    async with asyncio.timeout(20):
        async with aclosing(fanout.follow(key, 0)) as events:
            async for event in events:
                seen.append(event)
                if len(seen) == 3:
                    break
        async with aclosing(fanout.follow(key, seen[-1].seq + 1)) as events:
            async for event in events:
                seen.append(event)
    assert isinstance(seen[-1], ProcessExit)
    seqs = [e.seq for e in seen]
    assert seqs == sorted(set(seqs))
    assert b"".join(e.data for e in seen if isinstance(e, OutputChunk)) == EXPECTED


@pytest.fixture
async def small_pool(settings: Settings) -> AsyncIterator[HostPool]:
    """A pool on an agent whose output logs keep 4 KiB: little output is enough to evict some."""
    small = replace(settings, data_dir=settings.data_dir.with_name("small-cap"), output_cap_bytes=4096)
    agent = await start_agent("127.0.0.1:0", small)
    pool = HostPool(settings)
    pool.set_hosts({"h1": f"127.0.0.1:{agent.port}"})
    yield pool
    await pool.close()
    await agent.stop()


async def lines_one_chunk_each(
    client: HostClient, capsule_id: str, count: int
) -> tuple[ProcessKey, list[bytes]]:
    """Runs a writer whose lines (of growing length) are one chunk each; returns the lines as read."""
    # The writer waits for an answer to each line, so no two lines meet in one read.
    script = f'for i in $(seq 1 {count}); do printf "line-%0${{i}}d\\n" 0; read ack; done'
    key = await start(client, capsule_id, script, "stepped", stdin=True)
    lines: list[bytes] = []
    async with asyncio.timeout(10):
        async for batch in client.stream_output(capsule_id, key.tag, 0):
            for event in batch:
                if isinstance(event, OutputChunk):
                    lines.append(event.data)
                    await client.send_input(capsule_id, key.tag, b"\n")
    return key, lines


async def test_a_subscriber_inside_the_shared_streams_gap_gets_its_own_lost_bytes(
    small_pool: HostPool,
) -> None:
    client = small_pool.client("h1")
    capsule_id = f"cap-{uuid.uuid4().hex[:12]}"
    await client.create_capsule(capsule_id)
    key, lines = await lines_one_chunk_each(client, capsule_id, 40)
    assert [len(line) for line in lines] == [len(f"line-{0:0{i}d}\n") for i in range(1, 41)]
    fanout = OutputFanout(pool=small_pool, buffer_bytes=8 * 1024 * 1024)
    async with asyncio.timeout(10):
        async with aclosing(fanout.follow(key, 0)) as first:
            shared_gap = await anext(first)  # the shared stream, counted from seq 0
            assert isinstance(shared_gap, OutputGap) and shared_gap.seq > 6
            assert shared_gap.lost_bytes == sum(len(line) for line in lines[: shared_gap.seq])
            async with aclosing(fanout.follow(key, 6)) as second:  # one that saw six lines comes back
                own_gap = await anext(second)
                assert own_gap == OutputGap(
                    seq=shared_gap.seq,
                    lost_events=shared_gap.seq - 6,
                    lost_bytes=sum(len(line) for line in lines[6 : shared_gap.seq]),
                )
                rest = [e async for e in second]
            assert len(fanout._upstreams) == 1
            assert [e async for e in first] == rest
    assert b"".join(e.data for e in rest if isinstance(e, OutputChunk)) == b"".join(lines[shared_gap.seq :])


async def test_a_subscriber_from_where_the_gap_starts_shares_it(small_pool: HostPool) -> None:
    client = small_pool.client("h1")
    capsule_id = f"cap-{uuid.uuid4().hex[:12]}"
    await client.create_capsule(capsule_id)
    key, lines = await lines_one_chunk_each(client, capsule_id, 40)
    fanout = OutputFanout(pool=small_pool, buffer_bytes=8 * 1024 * 1024)
    async with asyncio.timeout(10):
        async with aclosing(fanout.follow(key, 0)) as first, aclosing(fanout.follow(key, 0)) as second:
            gaps = [await anext(first), await anext(second)]
            assert len(fanout._upstreams) == 1
    assert gaps[0] == gaps[1]
    assert isinstance(gaps[0], OutputGap)
    assert gaps[0].lost_bytes == sum(len(line) for line in lines[: gaps[0].seq])


async def test_the_pump_has_ended_once_the_last_subscriber_left(
    pool: HostPool, client: HostClient, capsule_id: str
) -> None:
    fanout = OutputFanout(pool=pool, buffer_bytes=8 * 1024 * 1024)
    key = await start(client, capsule_id, "echo first; cat", "quiet", stdin=True)
    async with asyncio.timeout(10):
        async with aclosing(fanout.follow(key, 0)) as events:
            assert isinstance(await anext(events), OutputChunk)
            assert fanout.pumps == 1
    assert fanout.pumps == 0  # cancelled and awaited as the subscriber left, not left to finish later
    assert fanout._upstreams == {}


async def test_close_ends_every_pump(pool: HostPool, client: HostClient, capsule_id: str) -> None:
    fanout = OutputFanout(pool=pool, buffer_bytes=8 * 1024 * 1024)
    keys = [await start(client, capsule_id, "echo first; cat", f"open-{i}", stdin=True) for i in range(3)]
    followers = [fanout.follow(key, 0) for key in keys]
    async with asyncio.timeout(10):
        for follower in followers:
            assert isinstance(await anext(follower), OutputChunk)
        assert fanout.pumps == 3
        pumps = [task for task in asyncio.all_tasks() if task.get_name().startswith("fanout-")]
        await fanout.close()
        assert fanout.pumps == 0 and all(task.done() for task in pumps)
        for follower in followers:  # never as if the output had ended: they are told to come back
            with pytest.raises(Unavailable, match="shutting down: subscribe again"):
                await anext(follower)
            await follower.aclose()

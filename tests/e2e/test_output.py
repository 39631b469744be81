"""processOutput over both WebSocket protocols: replay, follow, resume after a drop, encodings."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace
from typing import Any

import pytest

from app.config import Settings
from tests.e2e.client import PROTOCOLS, HttpClient, subscribe, ws_session
from tests.e2e.conftest import Server, running_server
from tests.e2e.test_processes import start

LINES = 300
EXPECTED = "".join(f"line {i}\n" for i in range(1, LINES + 1))
WRITER = f'for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.005; done'


async def read_events(
    server: Server, key: str, protocol: str, capsule_id: str, selector: str, from_seq: int, *, stop_after: int
) -> list[dict[str, Any]]:
    """Reads events until ProcessExited or until stop_after chunks, then drops the WebSocket."""
    events: list[dict[str, Any]] = []
    async with ws_session(server.ws_url, key, protocol) as session:
        async for result in subscribe(
            session, "ProcessOutput", capsuleId=capsule_id, selector=selector, fromSeq=from_seq
        ):
            events.append(result["processOutput"])
            if len([e for e in events if e["__typename"] == "OutputChunk"]) >= stop_after:
                break
    return events


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_resume_after_drop_has_no_duplicate_and_no_hole(
    server: Server, key: str, api: HttpClient, capsule_id: str, protocol: str
) -> None:
    await start(api, capsule_id, "sh", "-c", WRITER, tag="writer")
    async with asyncio.timeout(20):
        first = await read_events(server, key, protocol, capsule_id, "writer", 0, stop_after=3)
        seen = [e for e in first if e["__typename"] == "OutputChunk"]
        rest: list[dict[str, Any]] = []
        while not rest or rest[-1]["__typename"] != "ProcessExited":
            from_seq = (rest or seen)[-1]["seq"] + 1
            rest += await read_events(server, key, protocol, capsule_id, "writer", from_seq, stop_after=10**9)
    chunks = seen + [e for e in rest if e["__typename"] == "OutputChunk"]
    seqs = [c["seq"] for c in chunks]
    assert seqs == sorted(set(seqs)), "seqs must strictly increase across the reconnect"
    assert "".join(c["data"] for c in chunks) == EXPECTED
    assert all(c["encoding"] == "UTF8" and c["stream"] == "STDOUT" for c in chunks)
    assert rest[-1]["exitCode"] == 0 and rest[-1]["seq"] > seqs[-1]
    assert not any(e["__typename"] == "OutputGap" for e in rest)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_replay_of_an_exited_process(
    server: Server, key: str, api: HttpClient, capsule_id: str, protocol: str
) -> None:
    script = "printf 'out\\n'; printf 'err\\n' >&2; printf '\\377\\376'; exit 4"
    await start(api, capsule_id, "sh", "-c", script, tag="mixed")
    async with asyncio.timeout(10):
        events = await read_events(server, key, protocol, capsule_id, "mixed", 0, stop_after=10**9)
    chunks = [e for e in events if e["__typename"] == "OutputChunk"]
    stdout = b"".join(
        base64.b64decode(c["data"]) if c["encoding"] == "BASE64" else c["data"].encode()
        for c in chunks
        if c["stream"] == "STDOUT"
    )
    assert stdout == b"out\n\xff\xfe"
    assert "".join(c["data"] for c in chunks if c["stream"] == "STDERR") == "err\n"
    assert any(c["encoding"] == "BASE64" for c in chunks)
    assert events[-1]["__typename"] == "ProcessExited" and events[-1]["exitCode"] == 4


async def test_subscription_errors_carry_codes(server: Server, key: str, capsule_id: str) -> None:
    async with ws_session(server.ws_url, key, "graphql-transport-ws") as session:
        with pytest.raises(Exception) as caught:
            async for _ in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector="nope"):
                pass
    assert "NOT_FOUND" in repr(getattr(caught.value, "errors", caught.value))


# Lines of growing length, one chunk each: the writer waits for an answer to every line.
STEPPED = 'for i in $(seq 1 40); do printf "line-%0${i}d\\n" 0; read ack; done'
STEPPED_LINES = [f"line-{0:0{i}d}\n" for i in range(1, 41)]


async def read_stepped(
    server: Server, key: str, api: HttpClient, protocol: str, capsule_id: str
) -> list[str]:
    """Follows the STEPPED writer live, answering each line; the data of its chunks, by seq."""
    lines: list[str] = []
    async with ws_session(server.ws_url, key, protocol) as session:
        async for result in subscribe(session, "ProcessOutput", capsuleId=capsule_id, selector="stepped"):
            event = result["processOutput"]
            if event["__typename"] == "ProcessExited":
                break
            assert (event["__typename"], event["seq"]) == ("OutputChunk", len(lines))
            lines.append(event["data"])
            (await api.run("SendInput", capsuleId=capsule_id, selector="stepped", data="\n")).ok()
    return lines


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_gap_says_how_many_events_and_bytes_were_lost(settings: Settings, protocol: str) -> None:
    async with running_server(replace(settings, output_cap_bytes=4096)) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        try:
            capsule_id = str((await api.run("CreateCapsule")).ok()["createCapsule"]["id"])
            await start(api, capsule_id, "sh", "-c", STEPPED, tag="stepped", stdin=True)
            async with asyncio.timeout(20):
                assert await read_stepped(server, key, api, protocol, capsule_id) == STEPPED_LINES
                for from_seq in (0, 6):  # everything retained, and where a reader of six lines comes back
                    events = await read_events(
                        server, key, protocol, capsule_id, "stepped", from_seq, stop_after=10**9
                    )
                    gap = events[0]
                    assert gap["__typename"] == "OutputGap" and gap["seq"] > 6
                    assert gap["lostEvents"] == gap["seq"] - from_seq
                    assert gap["lostBytes"] == sum(len(line) for line in STEPPED_LINES[from_seq : gap["seq"]])
                    kept = "".join(e["data"] for e in events if e["__typename"] == "OutputChunk")
                    assert kept == "".join(STEPPED_LINES[gap["seq"] :])
        finally:
            await api.aclose()


async def test_no_output_pump_is_left_once_the_server_stops(settings: Settings) -> None:
    async with running_server(settings) as server:
        key = await server.new_key("team-a")
        api = HttpClient(server.url, key)
        capsule_id = str((await api.run("CreateCapsule")).ok()["createCapsule"]["id"])
        await start(api, capsule_id, "sh", "-c", "echo first; cat", tag="open", stdin=True)
        await api.aclose()
        fanout = server.state.platform.fanout
        reader = asyncio.create_task(
            read_events(server, key, "graphql-transport-ws", capsule_id, "open", 0, stop_after=10**9)
        )
        async with asyncio.timeout(10):
            while fanout.pumps == 0:  # the subscription is live: its pump reads from the agent
                await asyncio.sleep(0.01)
    # The server stopped with the subscription still open.
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert fanout.pumps == 0
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("fanout-")]

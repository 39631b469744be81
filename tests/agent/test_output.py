"""StreamOutput: replay, resume, gaps, binary data, UTF-8 cuts, and a flood nobody reads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from app import domain, wire
from app.pb import agent_pb2 as pb
from tests.agent.conftest import workspace_on_host
from tests.agent.helpers import chunks, grpc_error, joined, read_output, ref, start_sh, wait_exited

LINES = "for i in $(seq 1 300); do echo line-$i; echo err-$i >&2; done"
EXPECTED_OUT = "".join(f"line-{i}\n" for i in range(1, 301)).encode()
EXPECTED_ERR = "".join(f"err-{i}\n" for i in range(1, 301)).encode()


def check_seqs(events: list[domain.OutputEvent]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), "seqs must strictly increase"


class TestReplay:
    async def test_replay_from_zero_after_the_exit(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, LINES + "; exit 3")
        await wait_exited(stub, capsule, info.pid)
        events = await read_output(stub, capsule, info.pid)
        check_seqs(events)
        assert joined(events, domain.Stream.STDOUT) == EXPECTED_OUT
        assert joined(events, domain.Stream.STDERR) == EXPECTED_ERR
        last = events[-1]
        assert isinstance(last, domain.ProcessExit)
        assert (last.exit_code, last.signal, last.timed_out) == (3, None, False)
        assert not any(isinstance(e, domain.ProcessExit) for e in events[:-1])

    async def test_follow_live_output_to_the_exit(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "for i in 1 2 3; do echo tick-$i; sleep 0.1; done")
        events = await read_output(stub, capsule, info.pid)  # starts while the process runs
        assert joined(events) == b"tick-1\ntick-2\ntick-3\n"
        assert isinstance(events[-1], domain.ProcessExit)

    async def test_resume_from_seq_without_duplicate_or_hole(self, stub: Any, capsule: str) -> None:
        # Pauses between the streams make chunks that a replay cannot merge.
        script = "for i in $(seq 1 8); do echo line-$i; sleep 0.02; echo err-$i >&2; sleep 0.02; done"
        info = await start_sh(stub, capsule, script)
        await wait_exited(stub, capsule, info.pid)
        everything = chunks(await read_output(stub, capsule, info.pid))
        assert len(everything) > 2
        expected = {
            domain.Stream.STDOUT: "".join(f"line-{i}\n" for i in range(1, 9)).encode(),
            domain.Stream.STDERR: "".join(f"err-{i}\n" for i in range(1, 9)).encode(),
        }
        for cut in range(len(everything)):
            seen = everything[: cut + 1]
            rest = await read_output(stub, capsule, info.pid, from_seq=seen[-1].seq + 1)
            assert not any(isinstance(e, domain.OutputGap) for e in rest)
            assert seen[-1].seq < rest[0].seq
            for stream in domain.Stream:
                assert joined(seen, stream) + joined(rest, stream) == expected[stream]

    async def test_resume_while_live(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "echo first; read line; echo second", stdin=True)
        request = pb.OutputRequest(process=ref(capsule, info.pid), from_seq=0)
        async with asyncio.timeout(10):
            async for batch in stub.StreamOutput(request):
                first = batch.events[0].chunk
                break
        assert first.data == b"first\n"
        await stub.SendInput(pb.InputRequest(process=ref(capsule, info.pid), data=b"go\n"))
        rest = await read_output(stub, capsule, info.pid, from_seq=first.seq + 1)
        assert joined(rest) == b"second\n"
        assert isinstance(rest[-1], domain.ProcessExit)

    async def test_a_flood_of_short_lines_costs_few_messages(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done")
        await wait_exited(stub, capsule, info.pid)
        request = pb.OutputRequest(process=ref(capsule, info.pid), from_seq=0)
        batches = [batch async for batch in stub.StreamOutput(request)]
        assert len(batches) == 1  # ~30 KB of waiting events go out in one message
        assert len(batches[0].events) < 20

    async def test_a_from_seq_past_the_exit_ends_at_once(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "echo x")
        await wait_exited(stub, capsule, info.pid)
        exit_seq = (await read_output(stub, capsule, info.pid))[-1].seq
        assert await read_output(stub, capsule, info.pid, from_seq=exit_seq + 1) == []
        last = await read_output(stub, capsule, info.pid, from_seq=exit_seq)
        assert [type(e) for e in last] == [domain.ProcessExit]

    async def test_a_negative_from_seq(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "true")
        error = await grpc_error(read_output(stub, capsule, info.pid, from_seq=-1))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT

    async def test_output_of_an_unknown_process(self, stub: Any, capsule: str) -> None:
        error = await grpc_error(read_output(stub, capsule, "nobody"))
        assert error.code() is grpc.StatusCode.NOT_FOUND


class TestGap:
    async def test_a_gap_comes_first_when_events_were_evicted(self, make_stub: Any) -> None:
        cap = 4096
        stub = await make_stub(output_cap_bytes=cap)
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
        # More than the agent reads at once (1 MiB), so it comes in several chunks.
        info = await start_sh(stub, "c1", "seq 1 300000")
        await wait_exited(stub, "c1", info.pid)
        events = await read_output(stub, "c1", info.pid)
        gap = events[0]
        assert isinstance(gap, domain.OutputGap)
        assert gap.lost_events == gap.seq > 0
        written = "".join(f"{i}\n" for i in range(1, 300001)).encode()
        assert gap.lost_bytes == len(written) - len(joined(events)) > 0
        assert events[1].seq >= gap.seq  # a merged chunk carries the seq of its last part
        check_seqs(events[1:])
        kept = chunks(events)
        text = joined(events)
        # Within the cap, but the newest chunk is always kept whole.
        assert len(text) <= cap or len(kept) == 1
        assert text and "".join(f"{i}\n" for i in range(1, 300001)).encode().endswith(text)
        assert isinstance(events[-1], domain.ProcessExit)
        # Asking from inside the retained range needs no gap.
        again = await read_output(stub, "c1", info.pid, from_seq=gap.seq)
        assert not any(isinstance(e, domain.OutputGap) for e in again)

    async def test_a_gap_from_an_evicted_seq_counts_the_bytes_from_there(self, make_stub: Any) -> None:
        stub = await make_stub(output_cap_bytes=4096)
        await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
        # One line per chunk: the writer waits for an answer to each, and lines differ in length.
        script = 'for i in $(seq 1 40); do printf "line-%0${i}d\\n" 0; read ack; done'
        info = await start_sh(stub, "c1", script, stdin=True)
        live: list[domain.OutputEvent] = []
        async with asyncio.timeout(10):
            async for batch in stub.StreamOutput(pb.OutputRequest(process=ref("c1", info.pid))):
                for event in wire.output_events(batch):
                    live.append(event)
                    if isinstance(event, domain.OutputChunk):
                        await stub.SendInput(pb.InputRequest(process=ref("c1", info.pid), data=b"\n"))
        seen = chunks(live)
        assert [len(c.data) for c in seen] == [len(f"line-{0:0{i}d}\n") for i in range(1, 41)]
        resume = seen[5].seq + 1  # where a reader that saw six lines comes back
        events = await read_output(stub, "c1", info.pid, from_seq=resume)
        gap = events[0]
        assert isinstance(gap, domain.OutputGap) and gap.seq > resume
        assert gap.lost_events == gap.seq - resume
        assert gap.lost_bytes == sum(len(c.data) for c in seen if resume <= c.seq < gap.seq)
        assert joined(events) == b"".join(c.data for c in seen if c.seq >= gap.seq)


class TestBytes:
    async def test_binary_output_arrives_intact(self, stub: Any, capsule: str, tmp_path: Path) -> None:
        workspace = workspace_on_host(tmp_path, capsule)
        data = bytes(range(256)) * 1000 + b"\xe2\x82"  # ends inside a character, like text would
        (workspace / "blob").write_bytes(data)
        info = await start_sh(stub, capsule, "cat blob")
        events = await read_output(stub, capsule, info.pid)
        assert joined(events) == data

    async def test_a_character_written_in_two_halves_arrives_whole(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, r"printf 'price: \342\202'; sleep 0.3; printf '\254 only\n'")
        events = await read_output(stub, capsule, info.pid)
        pieces = [chunk.data for chunk in chunks(events)]
        assert b"".join(pieces) == "price: € only\n".encode()
        for piece in pieces:
            piece.decode("utf-8")  # no chunk splits the character
        assert any("€".encode() in piece for piece in pieces)

    async def test_stderr_and_stdout_are_kept_apart(self, stub: Any, capsule: str) -> None:
        info = await start_sh(stub, capsule, "echo out; echo err >&2")
        events = await read_output(stub, capsule, info.pid)
        assert (joined(events, domain.Stream.STDOUT), joined(events, domain.Stream.STDERR)) == (
            b"out\n",
            b"err\n",
        )


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_a_flood_nobody_reads_stays_within_the_cap(make_stub: Any) -> None:
    cap = 8 * 1024 * 1024
    stub = await make_stub(output_cap_bytes=cap)
    await stub.CreateCapsule(pb.CreateCapsuleRequest(capsule_id="c1"))
    baseline = peak = vm_rss()
    started = time.monotonic()
    info = await start_sh(stub, "c1", "head -c 200000000 /dev/zero")
    async with asyncio.timeout(15):  # the writer never blocks on a full pipe
        while (await stub.GetProcess(ref("c1", info.pid))).status != pb.PROCESS_EXITED:
            peak = max(peak, vm_rss())
            await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    peak = max(peak, vm_rss())
    assert peak - baseline < cap + 64 * 1024 * 1024, f"grew {(peak - baseline) >> 20} MiB"
    events = await read_output(stub, "c1", info.pid)
    gap, last = events[0], events[-1]
    assert isinstance(gap, domain.OutputGap) and gap.lost_events > 0
    assert isinstance(last, domain.ProcessExit) and last.exit_code == 0
    kept = len(joined(events))
    assert cap // 2 < kept <= cap
    print(f"200 MB in {elapsed:.2f} s, rss grew {(peak - baseline) >> 20} MiB, kept {kept >> 20} MiB")

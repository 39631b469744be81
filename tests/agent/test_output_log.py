"""The output log on its own: UTF-8 cuts, seqs, eviction, merging and followers."""

from __future__ import annotations

import asyncio

import pytest

from app.agent.output_log import EVENT_OVERHEAD_BYTES, OutputLog, Utf8Cutter, incomplete_tail
from app.domain import OutputChunk, OutputGap, ProcessExit, Stream, utcnow

EURO = "€".encode()  # three bytes


@pytest.mark.parametrize(
    ("data", "cut"),
    [
        (b"", 0),
        (b"abc", 3),
        (b"a" + EURO, 4),
        (b"a" + EURO[:1], 1),
        (b"a" + EURO[:2], 1),
        ("é".encode()[:1], 0),
        ("😀".encode()[:3], 0),
        ("😀".encode(), 4),
        (b"\xff", 1),  # not a lead byte: nothing to hold back
        (b"\x80\x80\x80", 3),
    ],
)
def test_incomplete_tail(data: bytes, cut: int) -> None:
    assert incomplete_tail(data) == cut


def test_the_cutter_holds_a_split_character_back() -> None:
    cutter = Utf8Cutter()
    assert cutter.feed(b"price " + EURO[:1]) == b"price "
    assert cutter.feed(EURO[1:2]) == b""
    assert cutter.feed(EURO[2:] + b"!") == EURO + b"!"
    assert cutter.flush() == b""


def test_the_cutter_passes_binary_data_raw() -> None:
    cutter = Utf8Cutter()
    binary = b"\xff\xfe\x00\x01" * 10 + EURO[:1]
    assert cutter.feed(binary) == binary


def test_the_cutter_flushes_raw_at_the_end() -> None:
    cutter = Utf8Cutter()
    assert cutter.feed(b"ok" + EURO[:2]) == b"ok"
    assert cutter.flush() == EURO[:2]


def close(log: OutputLog) -> ProcessExit:
    return log.close(exit_code=0, signum=None, timed_out=False, ended_at=utcnow())


def test_seqs_and_the_exit_event() -> None:
    log = OutputLog(cap_bytes=1 << 20)
    log.append_output(Stream.STDOUT, b"a")
    log.append_output(Stream.STDERR, b"b")
    log.append_output(Stream.STDOUT, b"c" + EURO[:1])
    exit_event = close(log)
    assert log.read(0) == [
        OutputChunk(0, Stream.STDOUT, b"a"),
        OutputChunk(1, Stream.STDERR, b"b"),
        # "c", then the held-back byte flushed raw at the end: merged under the last seq
        OutputChunk(3, Stream.STDOUT, b"c" + EURO[:1]),
        exit_event,
    ]
    assert exit_event.seq == 4
    assert close(log) is exit_event  # closing twice changes nothing


def test_small_chunks_of_one_stream_are_merged_under_their_last_seq() -> None:
    log = OutputLog(cap_bytes=1 << 20)
    for index in range(5):
        log.append_output(Stream.STDOUT, b"line %d\n" % index)
    log.append_output(Stream.STDERR, b"oops\n")
    assert log.read(0) == [
        OutputChunk(4, Stream.STDOUT, b"line 0\nline 1\nline 2\nline 3\nline 4\n"),
        OutputChunk(5, Stream.STDERR, b"oops\n"),
    ]
    assert log.read(2) == [
        OutputChunk(4, Stream.STDOUT, b"line 2\nline 3\nline 4\n"),
        OutputChunk(5, Stream.STDERR, b"oops\n"),
    ]


def test_eviction_keeps_the_cap_and_reports_a_gap() -> None:
    cap = 10 * (EVENT_OVERHEAD_BYTES + 100)
    log = OutputLog(cap_bytes=cap)
    for index in range(100):
        log.append_output(Stream.STDOUT, bytes([65 + index % 26]) * 100)
    assert log.retained_bytes <= cap
    assert log.first_seq == 90
    events = log.read(5)
    assert events[0] == OutputGap(seq=90, lost_events=85)
    assert isinstance(events[1], OutputChunk) and events[1].seq >= 90
    assert log.read(95)[0] == OutputChunk(
        99, Stream.STDOUT, b"".join(bytes([65 + i % 26]) * 100 for i in range(95, 100))
    )


def test_the_newest_chunk_stays_even_over_the_cap() -> None:
    log = OutputLog(cap_bytes=10)
    log.append_output(Stream.STDOUT, b"x" * 1000)
    log.append_output(Stream.STDOUT, b"y" * 1000)
    exit_event = close(log)
    assert log.read(1) == [OutputChunk(1, Stream.STDOUT, b"y" * 1000), exit_event]
    assert log.first_seq == 1


async def test_followers_get_live_events_and_leave_cleanly() -> None:
    log = OutputLog(cap_bytes=1 << 20)
    received: list[list[object]] = []

    async def follow() -> None:
        async for batch in log.follow(0):
            received.append(list(batch))

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)
    assert len(log._followers) == 1
    log.append_output(Stream.STDOUT, b"live")
    async with asyncio.timeout(5):
        while not received:
            await asyncio.sleep(0.001)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert received == [[OutputChunk(0, Stream.STDOUT, b"live")]]
    assert not log._followers


async def test_a_follower_ends_after_the_exit_event() -> None:
    log = OutputLog(cap_bytes=1 << 20)
    log.append_output(Stream.STDOUT, b"x")
    close(log)
    batches = [batch async for batch in log.follow(0)]
    assert isinstance(batches[-1][-1], ProcessExit)
    assert [batch async for batch in log.follow(99)] == []

"""The output log on its own: UTF-8 cuts, seqs, eviction, merging and followers."""

from __future__ import annotations

import asyncio

import pytest

from app.agent.output_log import (
    EVENT_OVERHEAD_BYTES,
    MERGE_BYTES,
    MIN_INDEXED,
    OutputLog,
    Utf8Cutter,
    incomplete_tail,
)
from app.domain import OutputChunk, OutputEvent, OutputGap, ProcessExit, Stream, merge_chunks, utcnow

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
    assert events[0] == OutputGap(seq=90, lost_events=85, lost_bytes=85 * 100)
    assert events[0].from_seq == 5
    assert isinstance(events[1], OutputChunk) and events[1].seq >= 90
    assert log.read(95)[0] == OutputChunk(
        99, Stream.STDOUT, b"".join(bytes([65 + i % 26]) * 100 for i in range(95, 100))
    )


def test_a_gap_counts_the_bytes_of_the_evicted_events_it_covers() -> None:
    # Chunks of different sizes, so a count of events could not stand in for the bytes.
    sizes = [1 + (index * 37) % 500 for index in range(200)]
    log = OutputLog(cap_bytes=20 * EVENT_OVERHEAD_BYTES + 2000)
    for index, size in enumerate(sizes):
        log.append_output(Stream.STDOUT if index % 3 else Stream.STDERR, b"x" * size)
    first = log.first_seq
    assert 0 < first < len(sizes)
    for from_seq in (0, 1, 17, first - 1):
        gap = log.read(from_seq)[0]
        assert gap == OutputGap(
            seq=first, lost_events=first - from_seq, lost_bytes=sum(sizes[from_seq:first])
        )
    assert not any(isinstance(e, OutputGap) for e in log.read(first))


def test_the_exit_event_adds_no_lost_bytes() -> None:
    log = OutputLog(cap_bytes=EVENT_OVERHEAD_BYTES + 10)
    log.append_output(Stream.STDOUT, b"a" * 10)
    log.append_output(Stream.STDOUT, b"b" * 10)
    exit_event = close(log)
    assert log.read(0) == [
        OutputGap(seq=1, lost_events=1, lost_bytes=10),
        OutputChunk(1, Stream.STDOUT, b"b" * 10),
        exit_event,
    ]


def test_the_offsets_of_evicted_events_stay_bounded_and_exact_where_kept() -> None:
    log = OutputLog(cap_bytes=4 * EVENT_OVERHEAD_BYTES)
    size = [index % 7 + 1 for index in range(5 * MIN_INDEXED)]
    for length in size:
        log.append_output(Stream.STDOUT, b"y" * length)
    first = log.first_seq
    assert first > 4 * MIN_INDEXED
    assert len(log._offsets) <= MIN_INDEXED
    oldest = first - len(log._offsets)  # the oldest seq the index still holds
    for from_seq in (0, oldest, oldest + 1, first - 1):
        gap = log.read(from_seq)[0]
        assert gap == OutputGap(seq=first, lost_events=first - from_seq, lost_bytes=sum(size[from_seq:first]))
    # Older than the index: counted from the oldest seq it holds, never more than was lost.
    older = log.read(oldest // 2)[0]
    assert older == OutputGap(seq=first, lost_events=first - oldest // 2, lost_bytes=sum(size[oldest:first]))


def test_merge_chunks_joins_runs_of_one_stream_up_to_the_cap() -> None:
    events: list[OutputEvent] = [
        OutputChunk(0, Stream.STDOUT, b"a" * 4),
        OutputChunk(1, Stream.STDOUT, b"b" * 4),
        OutputChunk(2, Stream.STDOUT, b"c" * 4),  # over the cap of 10 with a and b
        OutputChunk(3, Stream.STDERR, b"d"),
        OutputChunk(4, Stream.STDERR, b"e" * 20),  # alone over the cap: passes as it is
        OutputChunk(5, Stream.STDERR, b"f"),
        OutputGap(seq=9, lost_events=3, lost_bytes=30),
        OutputChunk(9, Stream.STDERR, b"g"),
    ]
    assert merge_chunks(events, max_bytes=10) == [
        OutputChunk(1, Stream.STDOUT, b"aaaabbbb"),
        OutputChunk(2, Stream.STDOUT, b"cccc"),
        OutputChunk(3, Stream.STDERR, b"d"),
        events[4],
        OutputChunk(5, Stream.STDERR, b"f"),
        events[6],
        events[7],
    ]
    assert merge_chunks(events[:3], max_bytes=MERGE_BYTES) == [OutputChunk(2, Stream.STDOUT, b"aaaabbbbcccc")]
    single = merge_chunks(events[:1], max_bytes=MERGE_BYTES)
    assert single[0] is events[0]  # nothing to join: no copy


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

"""Per-process output log: ordered events with seqs, a byte cap, UTF-8 cuts and followers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from array import array
from collections.abc import AsyncIterator
from datetime import datetime

from app.agent.tally import OutputTally
from app.domain import (
    OutputChunk,
    OutputEvent,
    OutputGap,
    ProcessExit,
    ProcessRestarted,
    Stream,
    merge_chunks,
)

# What one retained event costs beyond its data (the objects and the list slot). Counting it keeps
# a flood of tiny chunks within the cap in memory, not just in data bytes.
EVENT_OVERHEAD_BYTES = 160
BATCH_BYTES = 1024 * 1024
# Joining costs a copy: worth it for many small chunks (fewer events to encode), not for big ones.
MERGE_BYTES = 64 * 1024
# The offsets of evicted events (8 bytes each), which a gap's byte count needs, take at most
# 1/INDEX_SHARE of the cap on top of it, and room for MIN_INDEXED of them at least.
INDEX_SHARE = 16
MIN_INDEXED = 4096
# A live batch of at least LINGER_FROM_BYTES waits up to LINGER_SEC for more, to fill up.
LINGER_FROM_BYTES = 64 * 1024
LINGER_SEC = 0.002
# Validating a short window before a held-back tail is enough to tell text from binary data.
_UTF8_WINDOW = 256


def incomplete_tail(data: bytes | bytearray | memoryview) -> int:
    """Where a trailing, incomplete UTF-8 character starts in data; len(data) when there is none."""
    size = len(data)
    for back in range(1, min(3, size) + 1):
        byte = data[size - back]
        if byte < 0x80:
            return size
        if byte < 0xC0:  # a continuation byte: the lead is further back
            continue
        if 0xC2 <= byte <= 0xDF:
            need = 2
        elif 0xE0 <= byte <= 0xEF:
            need = 3
        elif 0xF0 <= byte <= 0xF4:
            need = 4
        else:
            return size
        return size - back if back < need else size
    return size


def _looks_like_utf8(data: memoryview) -> bool:
    start = 0
    # The window may open inside a character: skip its continuation bytes.
    while start < min(3, len(data)) and 0x80 <= data[start] < 0xC0:
        start += 1
    try:
        str(data[start:], "utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Utf8Cutter:
    """Holds back an incomplete trailing UTF-8 character of one stream until the rest is read."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes that can go out now; at most 3 trailing bytes wait for the next read."""
        if self._carry:
            data, self._carry = self._carry + data, b""
        cut = incomplete_tail(data)
        if cut == len(data):
            return data
        view = memoryview(data)
        # Binary data passes raw: holding bytes back only makes sense for text.
        if not _looks_like_utf8(view[max(0, cut - _UTF8_WINDOW) : cut]):
            return data
        self._carry = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        """Whatever is held back, raw: the stream has ended."""
        carry, self._carry = self._carry, b""
        return carry


def _cost(event: OutputEvent) -> int:
    return EVENT_OVERHEAD_BYTES + (len(event.data) if isinstance(event, OutputChunk) else 0)


class OutputLog:
    """The ordered events of one process: output chunks (a restarted event between two runs), then
    one exit event."""

    def __init__(self, cap_bytes: int, tally: OutputTally | None = None) -> None:
        self._cap = cap_bytes
        self._tally = tally or OutputTally()  # its capsule's, for the agent's metrics
        # Evicted slots become None and are compacted away in bulk, so eviction stays O(1).
        self._events: list[OutputEvent | None] = []
        self._head = 0
        self._first_seq = 0
        self._next_seq = 0
        self._newest_chunk_seq = 0
        self._retained = 0
        self._appended = 0  # what every event ever appended cost, to tell how fast output comes
        # So a gap from any evicted seq can say how many bytes it lost: the data bytes of every
        # evicted chunk, and where each evicted event began among them (_offsets[i] for the seq
        # _indexed_from + i). Bounded: when full, its older half goes (see _lost_bytes).
        self._evicted_bytes = 0
        self._offsets: array[int] = array("q")
        self._indexed_from = 0
        self._max_indexed = max(MIN_INDEXED, cap_bytes // (INDEX_SHARE * self._offsets.itemsize))
        self._exit: ProcessExit | None = None
        self._cutters = {Stream.STDOUT: Utf8Cutter(), Stream.STDERR: Utf8Cutter()}
        self._followers: set[asyncio.Future[None]] = set()

    @property
    def retained_bytes(self) -> int:
        """What the retained events cost against the cap."""
        return self._retained

    @property
    def first_seq(self) -> int:
        """The seq of the oldest retained event."""
        return self._first_seq

    @property
    def exit(self) -> ProcessExit | None:
        """The exit event, once the process has ended."""
        return self._exit

    def append_output(self, stream: Stream, data: bytes) -> None:
        """Adds what was read from a stream, cut on a UTF-8 character boundary."""
        self._tally.pipe_bytes += len(data)
        data = self._cutters[stream].feed(data)
        if data:
            self._append(OutputChunk(self._next_seq, stream, data))

    def end_stream(self, stream: Stream) -> None:
        """The stream reached EOF: what it held back goes out raw."""
        data = self._cutters[stream].flush()
        if data:
            self._append(OutputChunk(self._next_seq, stream, data))

    def restarted(
        self,
        *,
        pid: int,
        restarts: int,
        exit_code: int | None,
        signum: signal.Signals | None,
        oom_killed: bool = False,
    ) -> ProcessRestarted:
        """Marks where one run ended and the next (pid) began; what the last run held back goes out first."""
        for stream in Stream:
            self.end_stream(stream)
        event = ProcessRestarted(self._next_seq, pid, restarts, exit_code, signum, oom_killed)
        self._append(event)
        return event

    def close(
        self,
        *,
        exit_code: int | None,
        signum: signal.Signals | None,
        timed_out: bool,
        ended_at: datetime,
        oom_killed: bool = False,
    ) -> ProcessExit:
        """Appends the exit event; nothing comes after it."""
        if self._exit is not None:
            return self._exit
        for stream in Stream:
            self.end_stream(stream)
        self._exit = ProcessExit(self._next_seq, exit_code, signum, timed_out, ended_at, oom_killed)
        self._append(self._exit)
        return self._exit

    def _append(self, event: OutputEvent) -> None:
        if isinstance(event, OutputChunk):
            self._newest_chunk_seq = event.seq
        self._events.append(event)
        self._next_seq += 1
        cost = _cost(event)
        self._retained += cost
        self._appended += cost
        self._evict()
        self._wake()

    def _evict(self) -> None:
        # The newest chunk always stays, even when it alone is over the cap (the exit event after it too).
        while self._retained > self._cap and self._first_seq < self._newest_chunk_seq:
            event = self._events[self._head]
            assert event is not None
            self._retained -= _cost(event)
            self._offsets.append(self._evicted_bytes)
            self._tally.evicted_events += 1
            if isinstance(event, OutputChunk):
                self._evicted_bytes += len(event.data)
                self._tally.evicted_bytes += len(event.data)
            self._events[self._head] = None
            self._head += 1
            self._first_seq += 1
        if self._head > 1024 and self._head * 2 > len(self._events):
            del self._events[: self._head]
            self._head = 0
        if len(self._offsets) > self._max_indexed:  # in bulk, like the events: O(1) an eviction
            drop = len(self._offsets) // 2
            del self._offsets[:drop]
            self._indexed_from += drop

    def _lost_bytes(self, from_seq: int) -> int:
        """The output bytes the evicted events from from_seq up to the first retained one held."""
        if from_seq <= 0:
            return self._evicted_bytes
        # Exact from 0 and from every seq the index holds: at least the newest _max_indexed/2 evicted
        # events. A reader further behind than that gets the bytes from the oldest seq indexed, a
        # lower bound: exact for any older seq would take 8 bytes per event ever written, which no
        # cap would bound.
        return self._evicted_bytes - self._offsets[max(from_seq - self._indexed_from, 0)]

    def _wake(self) -> None:
        for follower in self._followers:
            if not follower.done():
                follower.set_result(None)

    def read(self, from_seq: int, max_bytes: int = BATCH_BYTES) -> list[OutputEvent]:
        """Retained events from from_seq, about max_bytes of them; a gap first if some were evicted."""
        return self._read(from_seq, max_bytes)[0]

    def _read(self, from_seq: int, max_bytes: int) -> tuple[list[OutputEvent], int]:
        events: list[OutputEvent] = []
        if from_seq < self._first_seq:
            lost = OutputGap(
                seq=self._first_seq,
                lost_events=self._first_seq - from_seq,
                lost_bytes=self._lost_bytes(from_seq),
            )
            events.append(lost)
            from_seq = self._first_seq
        size = 0
        end = len(self._events)
        index = self._head + (from_seq - self._first_seq)
        while index < end and size < max_bytes:
            event = self._events[index]
            assert event is not None
            events.append(event)
            size += _cost(event)
            index += 1
        return merge_chunks(events, max_bytes=MERGE_BYTES), size

    async def follow(self, from_seq: int) -> AsyncIterator[list[OutputEvent]]:
        """Replays from from_seq, then yields live batches; ends after the exit event."""
        next_seq = from_seq
        while True:
            batch, size = self._read(next_seq, BATCH_BYTES)
            if LINGER_FROM_BYTES <= size < BATCH_BYTES and self._exit is None:
                # Output is pouring in: a moment more fills the batch, and each message sent has a
                # fixed cost that dwarfs the copy of its bytes.
                await self._wait_for_appended(self._appended + BATCH_BYTES - size, LINGER_SEC)
                batch, size = self._read(next_seq, BATCH_BYTES)
            if batch:
                yield batch
                last = batch[-1]
                if isinstance(last, ProcessExit):
                    return
                # A gap's seq is the first retained event's, which the batch holds next.
                next_seq = last.seq if isinstance(last, OutputGap) else last.seq + 1
                continue
            if self._exit is not None:  # asked for events after the exit: there are none
                return
            await self._changed()

    async def _changed(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._followers.add(waiter)
        try:
            await waiter
        finally:
            self._followers.discard(waiter)

    async def _wait_for_appended(self, target: int, timeout_sec: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_sec):
                while self._appended < target and self._exit is None:
                    await self._changed()

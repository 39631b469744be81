"""What a restart policy and a readiness check decide: whether a run is started again and after how
long, and when a run counts as ready (a port that accepts connections, or an output line that matches)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from app.agent.child import Child, Sink
from app.domain import ProcessEvent, ReadinessSpec, RestartPolicy, RestartSpec, Stream

# Probes of a readiness port: quick at first, then at most this often.
PROBE_FIRST_SEC = 0.02
PROBE_MAX_SEC = 0.25
PROBE_CONNECT_SEC = 1.0
# A line is matched on its first bytes only: a pattern is no reason to buffer an endless line.
MAX_LINE_BYTES = 64 * 1024
# Each delay is off by up to this share either way, so processes that failed together restart apart.
JITTER = 0.1


@dataclass(frozen=True, slots=True)
class Supervision:
    """What a process with a restart policy or a readiness check needs from its supervisor."""

    respawn: Callable[[], Child]  # the next run, or CapsuleError when it cannot start
    publish: Callable[[ProcessEvent], None]  # READY and RESTARTED go out here
    run_ended: Callable[[int], None]  # the pid of a run whose group is gone
    restart: RestartSpec | None = None
    readiness: ReadinessSpec | None = None
    matcher: LineMatcher | None = None  # the sink of every run, for readiness.output_pattern


def should_restart(policy: RestartPolicy, code: int) -> bool:
    """Whether a run that ended with code (-N: signal N) on its own is started again."""
    if policy is RestartPolicy.ALWAYS:
        return True
    return policy is RestartPolicy.ON_FAILURE and code != 0


class Backoff:
    """backoff_sec before the first restart, doubling up to max_backoff_sec; back to backoff_sec after
    a run that lasted longer than max_backoff_sec (it was up, not crash-looping)."""

    def __init__(self, spec: RestartSpec) -> None:
        self._spec = spec
        self._failures = 0

    def next_delay(self, run_sec: float) -> float:
        """The delay before the next run, given how long the last one lasted."""
        if run_sec > self._spec.max_backoff_sec:
            self._failures = 0
        base = min(self._spec.backoff_sec * 2.0 ** min(self._failures, 64), self._spec.max_backoff_sec)
        self._failures += 1
        return base * random.uniform(1 - JITTER, 1 + JITTER)  # spreading, not secrecy


class LineMatcher:
    """Passes output on to sink and, while armed, calls on_match at the first line that matches."""

    def __init__(self, pattern: str, sink: Sink) -> None:
        self._pattern = re.compile(pattern)
        self._sink = sink
        self.on_match: Callable[[], None] | None = None  # set by the process it watches
        self._partial: dict[Stream, bytearray] = {stream: bytearray() for stream in Stream}
        self.armed = True

    def rearm(self) -> None:
        """A new run: its lines are matched afresh."""
        for partial in self._partial.values():
            partial.clear()
        self.armed = True

    def feed(self, stream: Stream, data: bytes) -> None:
        """The Sink the child writes to."""
        self._sink(stream, data)
        if not self.armed:
            return
        partial = self._partial[stream]
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            room = MAX_LINE_BYTES - len(partial)
            partial += data[start : start + min(end - start, max(room, 0))]
            start = end + 1
            line, partial[:] = bytes(partial), b""
            if self._matches(line):
                return
        room = MAX_LINE_BYTES - len(partial)
        if room > 0:
            partial += data[start : start + room]

    def _matches(self, line: bytes) -> bool:
        if self._pattern.search(line.decode("utf-8", "replace").rstrip("\r")) is None:
            return False
        self.armed = False
        for partial in self._partial.values():
            partial.clear()
        if self.on_match is not None:
            self.on_match()
        return True


async def wait_for_port(port: int) -> None:
    """Returns once something accepts TCP connections on 127.0.0.1:port (the capsule's loopback)."""
    delay = PROBE_FIRST_SEC
    while True:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(PROBE_CONNECT_SEC):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, PROBE_MAX_SEC)

"""The agent's plain counters, which its hot paths add to without a lock; app.agent.metrics reads them
when scraped. A capsule's supervisor keeps its own (it loads no Prometheus client: its agent asks it)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class Tally:
    """Plain counters of the agent's own that its hot paths add to."""

    __slots__ = ("streams_open",)

    def __init__(self) -> None:
        self.streams_open = 0  # StreamOutput calls being served


TALLY = Tally()


class OutputTally:
    """One capsule's output counters, which its supervisor's pipes and output logs add to."""

    __slots__ = ("evicted_bytes", "evicted_events", "pipe_bytes")

    def __init__(self) -> None:
        self.pipe_bytes = 0  # read from its processes' stdout, stderr and terminals
        self.evicted_events = 0  # dropped from output logs past their cap
        self.evicted_bytes = 0  # the output bytes of those events


@dataclass(frozen=True, slots=True)
class OutputCounts:
    """A capsule's output counters at one moment, with the log bytes held then."""

    pipe_bytes: int = 0
    log_bytes_held: int = 0
    evicted_events: int = 0
    evicted_bytes: int = 0


@dataclass(frozen=True, slots=True)
class CapsuleStat:
    """One capsule as the collector reports it; output is None while its sandbox has not told."""

    capsule_id: str
    running: int
    output: OutputCounts | None


class CapsuleStats(Protocol):
    """What an agent's capsules tell the collector (without waiting on anything)."""

    def stats(self) -> Iterable[CapsuleStat]: ...


AGENTS: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(capsules: CapsuleStats) -> None:
    """Adds an agent's capsules to what app.agent.metrics reports, while they live."""
    AGENTS.add(capsules)


def forget(capsules: CapsuleStats) -> None:
    AGENTS.discard(capsules)


_Servicer = TypeVar("_Servicer")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def counted_stream(
    method: Callable[[_Servicer, _Req, Any], AsyncIterator[_Resp]],
) -> Callable[[_Servicer, _Req, Any], AsyncIterator[_Resp]]:
    """Counts a server-streaming RPC in streams_open while it runs."""

    @functools.wraps(method)
    async def wrapper(self: _Servicer, request: _Req, context: Any) -> AsyncIterator[_Resp]:
        TALLY.streams_open += 1
        try:
            async for reply in method(self, request, context):
                yield reply
        finally:
            TALLY.streams_open -= 1

    return wrapper

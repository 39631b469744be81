"""The host agent's Prometheus metrics (`capsule agent --metrics ADDR`; the embedded agent's show on
the API server's /metrics).

Read when scraped, never counted per chunk with a lock: the output path adds to plain integers
(each capsule's supervisor's OutputTally, and TALLY for the agent's own streams), and one collector
reads them, and each live agent's capsules, at scrape time. Capsule ids are labels here (a host
holds a bounded number of capsules, and an operator asks which one is busy); a destroyed capsule's
series go with it.

In the sandbox runtime a capsule's processes, their pipes and their logs live in the sandbox's own
supervisor process, which counts them in its own OutputTally: the agent asks each live sandbox for
them (GetOutputCounters) in the background while someone scrapes, and a scrape reads the last answer,
so it never waits on a sandbox; a sandbox that has not answered yet has no series of them.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


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


_AGENTS: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(capsules: CapsuleStats) -> None:
    """Adds an agent's capsules to what the collector reports, while they live."""
    _AGENTS.add(capsules)


def forget(capsules: CapsuleStats) -> None:
    _AGENTS.discard(capsules)


class AgentCollector(Collector):
    """The agent's metrics, read at each scrape."""

    def collect(self) -> Iterator[Metric]:
        processes = GaugeMetricFamily(
            "capsule_agent_processes_running", "Background processes running, by capsule", labels=["capsule"]
        )
        held = GaugeMetricFamily(
            "capsule_agent_log_bytes_held", "Output log bytes held for replay, by capsule", labels=["capsule"]
        )
        pipe = CounterMetricFamily(
            "capsule_agent_pipe_bytes",
            "Bytes read from processes' stdout, stderr and terminals, by capsule",
            labels=["capsule"],
        )
        evictions = CounterMetricFamily(
            "capsule_agent_log_evictions",
            "Output events evicted from logs past their cap, by capsule",
            labels=["capsule"],
        )
        evicted = CounterMetricFamily(
            "capsule_agent_log_evicted_bytes",
            "Output bytes evicted from logs past their cap, by capsule",
            labels=["capsule"],
        )
        capsules = 0
        for agent in list(_AGENTS):
            for stat in agent.stats():
                capsules += 1
                labels = [stat.capsule_id]
                processes.add_metric(labels, stat.running)
                if (output := stat.output) is not None:
                    held.add_metric(labels, output.log_bytes_held)
                    pipe.add_metric(labels, output.pipe_bytes)
                    evictions.add_metric(labels, output.evicted_events)
                    evicted.add_metric(labels, output.evicted_bytes)
        yield GaugeMetricFamily("capsule_agent_capsules", "Capsules this agent holds", value=capsules)
        yield processes
        yield held
        yield pipe
        yield evictions
        yield evicted
        yield GaugeMetricFamily(
            "capsule_agent_output_streams", "Output streams open to API servers", value=TALLY.streams_open
        )


COLLECTOR = AgentCollector()
REGISTRY.register(COLLECTOR)

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


def serve(address: str) -> None:
    """Serves /metrics on HOST:PORT from a thread of its own."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    logger.info("agent metrics on http://%s/metrics", address)

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

import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.agent import tally

logger = logging.getLogger(__name__)


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
        for agent in list(tally.AGENTS):
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
            "capsule_agent_output_streams",
            "Output streams open to API servers",
            value=tally.TALLY.streams_open,
        )


COLLECTOR = AgentCollector()
REGISTRY.register(COLLECTOR)


def serve(address: str) -> None:
    """Serves /metrics on HOST:PORT from a thread of its own."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    logger.info("agent metrics on http://%s/metrics", address)

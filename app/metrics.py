"""The API server's Prometheus metrics: one definition each, incremented where the event happens.

A leaf (it imports prometheus_client only), so services, hosts, the bus and the API all count into
it. Every label takes values from a closed set (an outcome, an error code, a root field of the
schema, an RPC of the agent, a host id from the operator's own configuration): no team name, key,
capsule id or client-chosen text ever becomes a label, so the series stay bounded.

The gauges of what runs (capsules and processes per host) are read from the store when /metrics is
scraped (app.services.health.Health.refresh_gauges), not counted here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["REGISTRY", "exit_outcome", "render", "timed"]

# No *_created series beside each counter: Prometheus has no use for them, and they double a scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

# How a process ended, as processes_exited_total counts it.
OUTCOMES = ("zero", "non_zero", "signal", "timed_out", "oom", "restarted", "unknown")

CAPSULES = Gauge(
    "capsule_capsules",
    "Capsules on record, by host and status (read from the store at each scrape)",
    ["host", "status"],
)
PROCESSES_RUNNING = Gauge(
    "capsule_processes_running", "Processes on record as RUNNING, by host (read at each scrape)", ["host"]
)
PROCESSES_STARTED = Counter("capsule_processes_started", "Processes started and recorded by this replica")
PROCESSES_EXITED = Counter(
    "capsule_processes_exited",
    "Process exits recorded by this replica, by outcome (restarted: a run its restart policy replaced)",
    ["outcome"],
)
OUTPUT_EVENTS = Counter("capsule_output_events", "Output events (chunks, gaps, exits) sent to subscribers")
OUTPUT_BYTES = Counter("capsule_output_bytes", "Output bytes (chunk data) sent to subscribers")
OUTPUT_GAPS = Counter("capsule_output_gaps", "OutputGap events sent to subscribers")
# How many subscribers the output events a task reads go to: 1, or a multiplexed group's members
# (api/multiplex.py), whose one stream counts each event once per member.
OUTPUT_AUDIENCE: ContextVar[Callable[[], int] | None] = ContextVar("output_audience", default=None)
OUTPUT_UPSTREAMS = Gauge("capsule_output_upstreams", "Output streams from host agents open now")
WS_CONNECTIONS = Gauge("capsule_ws_connections", "WebSocket connections open now, by protocol", ["protocol"])
WS_SUBSCRIPTIONS = Gauge(
    "capsule_ws_subscriptions", "Subscriptions running now, by root field", ["operation"]
)
GRAPHQL_OPERATIONS = Counter(
    "capsule_graphql_operations",
    "GraphQL operations finished, by type, root field and error code (none: no error)",
    ["type", "operation", "code"],
)
GRAPHQL_SECONDS = Histogram(
    "capsule_graphql_operation_seconds",
    "Duration of GraphQL queries and mutations, by type and root field",
    ["type", "operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
HOST_CALLS = Counter(
    "capsule_host_calls", "gRPC calls to host agents, by method and status", ["method", "status"]
)
HOST_CALL_SECONDS = Histogram(
    "capsule_host_call_seconds",
    "Duration of unary gRPC calls to host agents, by method",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 120.0),
)
HOSTS_REACHABLE = Gauge("capsule_host_reachable", "1 while a host agent's lifecycle stream is open", ["host"])
BUS_PUBLISHES = Counter("capsule_bus_publishes", "Bus messages published, by outcome", ["outcome"])
BUS_DELIVERIES = Counter("capsule_bus_deliveries", "Bus messages received from the backend")
BUS_RECONNECTS = Counter("capsule_bus_reconnects", "Times the bus reached its backend again after losing it")
RATE_LIMITED = Counter(
    "capsule_rate_limit_refusals",
    "Requests refused with RATE_LIMITED, by limit",
    ["limit"],
)
AUTH_FAILURES = Counter("capsule_auth_failures", "Requests and connections refused for a missing or bad key")


def exit_outcome(
    *,
    exit_code: int | None,
    signal: object | None,
    timed_out: bool,
    oom_killed: bool = False,
) -> str:
    """The outcome label of a process's end."""
    if oom_killed:
        return "oom"
    if timed_out:
        return "timed_out"
    if signal is not None:
        return "signal"
    if exit_code == 0:
        return "zero"
    if exit_code is not None:
        return "non_zero"
    return "unknown"


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    """Observes the block's duration on a histogram (already labelled)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


def render(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)

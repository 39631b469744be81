"""OpenTelemetry: spans reach an OTLP collector when OTEL_EXPORTER_OTLP_ENDPOINT is set; unset, none
of the tracing code is even imported."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.client import HttpClient
from tests.e2e.test_processes import start
from tests.e2e.test_restarts import serving
from tests.system import modules_of_the_default_server

DEADLINE_SEC = 30.0


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps the name of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(span.name for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(None)


async def test_spans_of_operations_and_host_calls_reach_the_collector(tmp_path: Path) -> None:
    async with collector() as (receiver, port):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export soon after the spans end
        }
        async with serving(tmp_path, **env) as serve:
            api = HttpClient(f"{serve.url}/graphql", serve.key)
            try:
                capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
                await start(api, capsule_id, "true")
            finally:
                await api.aclose()
            async with asyncio.timeout(DEADLINE_SEC):
                while not (
                    any("StartProcess" in name for name in receiver.spans)
                    and any("GraphQL" in name or "mutation" in name.lower() for name in receiver.spans)
                ):
                    await asyncio.sleep(0.05)
            await serve.stop()
    assert any(name.endswith("/StartProcess") for name in receiver.spans), receiver.spans


def test_without_the_endpoint_no_tracing_code_is_imported() -> None:
    """redis-py imports OpenTelemetry's metrics API by itself (where the bus is Redis); nothing of
    tracing (the SDK's tracer, the exporter, the instrumentation, strawberry's extension) loads."""
    tracing = (
        "opentelemetry.sdk.trace",
        "opentelemetry.exporter",
        "opentelemetry.instrumentation",
        "strawberry.extensions.tracing.opentelemetry",
        "app.tracing",
    )
    assert modules_of_the_default_server(*tracing) == []

"""OpenTelemetry traces, only where OTEL_EXPORTER_OTLP_ENDPOINT names a collector.

Nothing here imports OpenTelemetry at module level: without the variable, `capsule serve` loads none
of it and pays nothing. With it, spans go over OTLP/gRPC (the SDK reads the usual OTEL_* variables:
the endpoint, headers, OTEL_SERVICE_NAME, sampling) from strawberry's OpenTelemetry extension (one
span per operation, its parse, validation and resolvers) and from every call to a host agent, over
gRPC or to the embedded agent in this process.
"""

from __future__ import annotations

import logging
from typing import Any

from app.hosts import local

logger = logging.getLogger(__name__)

SERVICE_NAME = "capsule"

_provider: Any = None


def enable(endpoint: str) -> Any:
    """Sets up the tracer provider, its OTLP exporter and the gRPC client instrumentation, once.

    Returns strawberry's OpenTelemetryExtension class, for the schema's extensions.
    """
    global _provider  # noqa: PLW0603 - one provider per process
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from strawberry.extensions.tracing import OpenTelemetryExtension

    if _provider is None:
        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
        # The embedded agent is called in this process, not over gRPC: its calls get the same spans.
        tracer = trace.get_tracer("app.hosts.local")
        local.start_span = lambda name: tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT)
        _provider = provider
        logger.info("tracing: OpenTelemetry spans go to %s", endpoint)
    return OpenTelemetryExtension


def shutdown() -> None:
    """Sends the spans still buffered; the provider stays (a later start in this process reuses it)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=2000)

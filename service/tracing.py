"""Opt-in OpenTelemetry tracing of ``/rerank``: a span per request, its trace continued from the caller's
``traceparent``, with child spans for the feature lookup, the queue wait and the model.

Owns: building the tracer from the settings (``RERANK_TRACING``: off, otlp or console), and turning one request's
timestamps into spans once it is answered, so tracing adds nothing before the answer is built. Does not know: HTTP,
admission or models. Off (the default), nothing imports this module, and the only cost on the request path is one
``is None`` check; the SDK and the OTLP exporter are an optional extra (``pip install '.[tracing]'``) that the
image does not carry.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

SERVICE_NAME = "dnr-rerank"
KINDS = ("otlp", "console")


@dataclass(frozen=True)
class RequestTimes:
    """One request's moments on the monotonic clock, as the handler saw them; (0, 0) for a stage it never reached."""

    started: float  # the handler's first line
    ended: float  # the answer built
    features: tuple[float, float] = (0.0, 0.0)  # the user-feature lookup
    queue: tuple[float, float] = (0.0, 0.0)  # submitted to the batcher -> its batch started
    model: tuple[float, float] = (0.0, 0.0)  # the batch's model call (shared by every request in the batch)
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


class Tracing:
    """A tracer and the W3C trace-context propagator; ``record`` writes one request's spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("service.app")
        self.propagator = TraceContextTextMapPropagator()

    def record(self, headers: Mapping[str, str], times: RequestTimes, error: str | None = None) -> None:
        """The request's span (a child of the caller's ``traceparent`` when it sent one) and its stages' spans,
        with the timestamps they happened at."""
        to_ns = wall_clock_ns()
        parent = self.propagator.extract(carrier=dict(headers))
        span = self.tracer.start_span("POST /rerank", context=parent, kind=trace.SpanKind.SERVER,
                                      start_time=to_ns(times.started), attributes=times.attributes)
        if not span.is_recording():  # not sampled: its stages would not be recorded either
            return
        inside = trace.set_span_in_context(span)
        for name, (start, end) in (("features", times.features), ("queue", times.queue), ("model", times.model)):
            if start and end:
                self.tracer.start_span(name, context=inside, start_time=to_ns(start)).end(end_time=to_ns(end))
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end(end_time=to_ns(times.ended))

    def shutdown(self) -> None:
        """Export what is still batched."""
        self.provider.shutdown()


def from_settings(kind: str, sample_ratio: float = 1.0) -> Tracing:
    """A tracer exporting by OTLP over HTTP (``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other standard variables
    configure it; the exporter is in the ``tracing`` extra) or to stdout (console), in a background batch; the
    caller's sampling decision is kept, a new trace is sampled at ``sample_ratio``."""
    if kind not in KINDS:
        raise ValueError(f"tracing {kind!r} is not one of {KINDS}")
    exporter: SpanExporter = ConsoleSpanExporter()
    if kind == "otlp":
        module = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        exporter = module.OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


def wall_clock_ns() -> Callable[[float], int]:
    """Monotonic seconds -> wall-clock nanoseconds (what spans carry), by one offset read now."""
    offset = time.time_ns() - time.monotonic_ns()
    return lambda t: int(t * 1e9) + offset

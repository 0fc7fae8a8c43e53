"""CPU per /rerank request that tracing adds, in-process: ``Tracing.record`` of one request's spans (the request and
its features, queue and model stages) into the SDK's batch processor, exported to an exporter that drops them.

    python -m loadtest.tracing_cost [--records 20000] [--repeats 3]

Prints the median over repeats of process CPU (the batch thread's export included) per request: sampled, sampled
by the caller's traceparent, and a new trace at a 1% sample ratio (most requests not sampled). Needs the
``tracing`` extra.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from service.tracing import RequestTimes, Tracing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def cpu_us_per_request(ratio: float, headers: dict[str, str], records: int) -> float:
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Dropped(), max_queue_size=max(records, 512)))
    tracing = Tracing(provider)
    t = time.monotonic()
    times = RequestTimes(t, t + 0.002, (t, t + 0.0001), (t + 0.0001, t + 0.0003), (t + 0.0003, t + 0.0012),
                         {"rerank.request_id": "r-1", "rerank.model_version": "v", "rerank.candidates": 50,
                          "rerank.fallback": False, "http.response.status_code": 200})
    start = time.process_time()
    for _ in range(records):
        tracing.record(headers, times)
    provider.shutdown()  # what is still batched is exported, on this process's CPU too
    return (time.process_time() - start) / records * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tracing_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="requests traced per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (the median is printed)")
    args = parser.parse_args(argv)
    for name, ratio, headers in (("sampled (ratio 1)", 1.0, {}),
                                 ("sampled by the caller's traceparent", 1.0, {"traceparent": TRACEPARENT}),
                                 ("new traces at ratio 0.01", 0.01, {})):
        runs = [cpu_us_per_request(ratio, headers, args.records) for _ in range(args.repeats)]
        print(f"{name}: {statistics.median(runs):.1f} us CPU per request "
              f"({', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

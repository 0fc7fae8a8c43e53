"""Opt-in tracing: a span per /rerank request in the caller's trace, with features, queue and model children at
the moments they happened, read back from an in-memory exporter; and off, service/tracing.py is not even imported
(FastAPI imports the OpenTelemetry API, and redis-py the SDK where it is installed, on their own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.app import create_app
from service.tracing import Tracing, from_settings
from tests.conftest import service_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def traced(model_root: Path) -> tuple[TestClient, InMemorySpanExporter, dict[str, object]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(service_settings(model_root), tracing=Tracing(provider))
    body = json.loads((model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[0])["request"]
    with TestClient(app) as client:
        yield client, exporter, body  # type: ignore[misc]


def test_a_request_continues_the_callers_trace_with_its_stages_inside(
        traced: tuple[TestClient, InMemorySpanExporter, dict[str, object]]) -> None:
    client, exporter, body = traced
    r = client.post("/rerank", json={**body, "request_id": "follow-me"},
                    headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /rerank", "features", "queue", "model"}
    root = spans["POST /rerank"]
    assert format(root.context.trace_id, "032x") == TRACE_ID and format(root.parent.span_id, "016x") == PARENT_ID
    assert root.kind == trace.SpanKind.SERVER and root.status.is_ok
    assert root.attributes["rerank.request_id"] == "follow-me"
    assert root.attributes["rerank.model_version"] == "tiny-v1" and root.attributes["rerank.fallback"] is False
    for name in ("features", "queue", "model"):
        child = spans[name]
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time, name
    assert spans["features"].end_time <= spans["queue"].start_time
    assert spans["queue"].end_time == spans["model"].start_time  # the batch began when this request's wait ended


def test_a_refused_request_is_an_error_span_and_a_new_request_a_new_trace(
        traced: tuple[TestClient, InMemorySpanExporter, dict[str, object]]) -> None:
    client, exporter, body = traced
    assert client.post("/rerank", json={"user_id": "u"}).status_code == 422
    assert client.post("/rerank", json=body).status_code == 200
    refused, answered = [s for s in exporter.get_finished_spans() if s.name == "POST /rerank"]
    assert refused.status.status_code == trace.StatusCode.ERROR and refused.attributes["rerank.error"] == \
        "invalid_request"
    assert refused.parent is None and answered.parent is None
    assert refused.context.trace_id != answered.context.trace_id


def test_tracing_kinds_build_or_are_refused() -> None:
    assert isinstance(from_settings("console"), Tracing)
    with pytest.raises(ValueError, match="bogus"):
        from_settings("bogus")


def test_off_the_service_does_not_import_its_tracing(model_root: Path) -> None:
    code = ("import sys; from service.app import create_app; from tests.conftest import service_settings; "
            f"from pathlib import Path; app = create_app(service_settings(Path({str(model_root)!r}))); "
            "print(app.state.service.tracing, 'service.tracing' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["None", "False"], run.stderr[-2000:]

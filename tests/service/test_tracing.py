"""Opt-in tracing: a span per /rerank request in the caller's trace, with features, queue and model children at
the moments they happened, read back from an in-memory exporter; and off, service/tracing.py is not even imported
(FastAPI imports the OpenTelemetry API, and redis-py the SDK where it is installed, on their own)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import logs
from service.app import create_app, door_refusals, service_of
from service.tracing import Tracing, from_settings
from tests.conftest import ServiceThread, service_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def traced(model_root: Path) -> tuple[TestClient, InMemorySpanExporter, dict[str, object]]:
    tracing, exporter = in_memory()
    app = create_app(service_settings(model_root), tracing=tracing)
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


def test_a_caller_that_did_not_sample_gets_no_spans(
        traced: tuple[TestClient, InMemorySpanExporter, dict[str, object]]) -> None:
    client, exporter, body = traced
    r = client.post("/rerank", json=body, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert r.status_code == 200 and exporter.get_finished_spans() == ()
    assert client.post("/rerank", json=body).status_code == 200 and len(exporter.get_finished_spans()) == 4


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


@pytest.mark.parametrize("door", ["asgi", "parser"])
def test_a_door_refusal_is_an_access_line_and_an_error_span_in_the_callers_trace(
        model_root: Path, door: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 429 answered before any handler (both doors) is still seen: the access line says the door refused it and
    why, and the span joins the trace the caller's traceparent names."""
    tracing, exporter = in_memory()
    settings = service_settings(model_root, admission="fixed", max_in_flight=1, admission_door=door, access_log=True)
    caplog.set_level(logging.INFO, logger=logs.ACCESS)
    with ServiceThread(settings, tracing=tracing) as svc:
        assert (svc.server.config.http == "httptools") == (door == "asgi")
        gate = service_of(svc.app).gate
        gate.in_flight = 1  # one request being answered: the gate is full
        r = httpx.post(f"{svc.url}/rerank", content=b"{not json", headers={
            "Content-Type": "application/json", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
            "X-Request-Id": "gw-7"})
        gate.in_flight = 0
    assert r.status_code == 429
    [span] = exporter.get_finished_spans()
    assert span.name == "POST /rerank" and span.status.status_code == trace.StatusCode.ERROR
    assert format(span.context.trace_id, "032x") == TRACE_ID and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes["rerank.door"] is True and span.attributes["http.response.status_code"] == 429
    assert span.attributes["rerank.error"] == "overloaded" and span.attributes["rerank.error_field"] == "in_flight"
    assert span.attributes["rerank.request_id"] == "gw-7" and span.start_time <= span.end_time
    [line] = [rec.__dict__["event"] for rec in caplog.records if rec.name == logs.ACCESS]
    assert line["status"] == 429 and line["door"] is True and line["error"] == "overloaded"
    assert line["field"] == "in_flight" and line["request_id"] == "gw-7" and line["total_ms"] >= 0


def test_door_refusals_cost_nothing_more_with_logs_and_tracing_off(model_root: Path) -> None:
    tracing, _ = in_memory()
    assert door_refusals(service_of(create_app(service_settings(model_root)))) is None
    assert door_refusals(service_of(create_app(service_settings(model_root, access_log=True)))) is not None
    assert door_refusals(service_of(create_app(service_settings(model_root), tracing=tracing))) is not None


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

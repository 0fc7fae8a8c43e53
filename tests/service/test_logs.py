"""Logs: one format for every record (the service's and uvicorn's), JSON or text, and the opt-in access log, down to
a real `python -m service` process whose every log line parses."""

from __future__ import annotations

import io
import json
import logging
import random
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loadtest.procs import ServiceProcess
from service import logs
from service.app import Service, create_app, logs_access, service_of
from tests.conftest import service_settings


def record(msg: str = "hello %s", event: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    error = ValueError("boom")
    exc_info = (ValueError, error, error.__traceback__) if exc else None
    rec = logging.LogRecord("rerank.app", logging.WARNING, __file__, 1, msg, ("world",), exc_info)
    if event is not None:
        rec.event = event
    return rec


def test_json_lines_carry_the_record_the_event_and_the_exception() -> None:
    line = logs.JsonFormatter().format(record(event={"request_id": "r1", "total_ms": 1.5}, exc=True))
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "hello world" and out["level"] == "warning" and out["logger"] == "rerank.app"
    assert out["request_id"] == "r1" and out["total_ms"] == 1.5 and isinstance(out["pid"], int)
    assert out["ts"].endswith("Z") and "ValueError: boom" in out["exc"]


def test_text_lines_put_the_event_after_the_message() -> None:
    line = logs.TextFormatter().format(record(event={"request_id": "r1", "status": 200}))
    assert line.endswith("hello world request_id=r1 status=200") and "WARNING rerank.app" in line


def test_configure_sends_uvicorns_records_through_the_same_format() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure("info", "json", stream)
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 7)
        logging.getLogger("rerank.app").debug("not at info")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["logger"] == "uvicorn.error" and json.loads(line)["msg"] == "Started server process [7]"


@pytest.mark.slow
def test_a_real_service_logs_json_and_one_access_event_per_request(model_root: Path, tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    env = {"RERANK_MODEL_DIR": str(model_root), "RERANK_MODEL_VERSION": "tiny-v1", "RERANK_REDIS_URL": "",
           "RERANK_LOG_LEVEL": "info", "RERANK_LOG_FORMAT": "json", "RERANK_ACCESS_LOG": "true",
           "RERANK_DRAIN_DELAY_S": "0"}
    row = json.loads((model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[0])
    body = json.dumps({**row["request"], "request_id": "follow-me"}).encode()
    with ServiceProcess(env, log) as svc:
        for data in (body, b'{"user_id": "u"}'):
            req = urllib.request.Request(f"{svc.url}/rerank", data=data, headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=10).read()
            except urllib.error.HTTPError as exc:
                assert exc.code == 422
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line parses
    access = [x for x in lines if x["logger"] == logs.ACCESS]
    ok = next(x for x in access if x["request_id"] == "follow-me")
    assert ok["status"] == 200 and ok["model_version"] == "tiny-v1" and ok["fallback_reason"] is None
    assert ok["total_ms"] >= ok["features_ms"] + ok["batch_ms"] > 0 and ok["worker_pid"] == ok["pid"]
    assert ok["batch_ms"] >= ok["queue_ms"] + ok["model_ms"] - 0.01 and ok["model_ms"] > 0
    assert ok["candidates"] == len(row["request"]["candidates"])
    refused = [x for x in access if x["status"] == 422]
    assert len(access) == 2 and refused[0]["error"] == "invalid_request" and refused[0]["field"] == "candidates"
    assert "door" not in refused[0] and ok["field"] is None
    assert any(x["logger"].startswith("uvicorn") for x in lines)  # uvicorn's own records, in the same format
    assert any(x["logger"] == "rerank.app" and x["msg"].startswith("ready") for x in lines)


def test_the_access_log_samples_answers_and_429s_but_keeps_every_fallback_and_error(model_root: Path) -> None:
    def svc(**settings: object) -> Service:
        return service_of(create_app(service_settings(model_root, **settings)))

    random.seed(7)
    half = svc(access_log=True, access_log_sample=0.25)
    kept = sum(logs_access(half, always=False) for _ in range(4000))
    assert 800 < kept < 1200  # about a quarter of answers and refusals
    assert all(logs_access(half, always=True) for _ in range(200))  # fallbacks and other errors, every one
    assert all(logs_access(svc(access_log=True), always=False) for _ in range(200))  # the default: every request
    assert not any(logs_access(svc(access_log_sample=1.0), always=True) for _ in range(10))  # off is off

"""How the service logs: one format for every record (its own and uvicorn's), plain text for a terminal or one JSON
object per line for a log pipeline, and the opt-in access log of ``/rerank``.

Owns: the formatters, configuring the root logger once per process (uvicorn's loggers propagate to it, so their
records come out in the same format), and the access event's fields. Does not know: HTTP, models or metrics.

A JSON line holds ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``msg``, ``pid`` and the record's
``event`` fields when it has them (``log.info(..., extra={"event": {...}})``); an exception adds ``exc``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"
ACCESS = "rerank.access"  # the access log's logger: one event per /rerank request when RERANK_ACCESS_LOG is on
LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
            "pid": record.process}
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            out.update(event)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The plain line, with the event's fields after the message as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        event = getattr(record, "event", None)
        if isinstance(event, dict) and event:
            line += " " + " ".join(f"{k}={v}" for k, v in event.items())
        return line


def configure(level: str, fmt: LogFormat, stream: Any = None) -> None:
    """The root logger of this process at ``level``, writing ``fmt`` lines to ``stream`` (stderr); uvicorn's loggers
    hand their records to it (the server runs uvicorn with ``log_config=None``)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.setLevel(logging.NOTSET)  # the root's level decides (uvicorn.Config sets the same one again)
        uv.propagate = True


def access_event(request_id: str | None, status: int, total_s: float, model_version: str | None = None,
                 fallback_reason: str | None = None, candidates: int | None = None,
                 stages_s: dict[str, float] | None = None, error: str | None = None, field: str | None = None,
                 door: bool = False) -> dict[str, Any]:
    """The fields of one access-log event: which request, what answered (or the error code and the field or
    limit it names), and where the time went, in milliseconds (``stages_s``: name -> seconds). ``door``: refused
    by an admission door before any handler (``door: true``; the request id is then the caller's X-Request-Id header,
    if any: the body was never read)."""
    return {"event": "rerank", "request_id": request_id, "status": status, "error": error, "field": field,
            "model_version": model_version, "fallback_reason": fallback_reason, "candidates": candidates,
            "total_ms": round(total_s * 1000, 3),
            **{f"{k}_ms": round(v * 1000, 3) for k, v in (stages_s or {}).items()}, "worker_pid": os.getpid(),
            **({"door": True} if door else {})}

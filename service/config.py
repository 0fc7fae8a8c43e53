"""Service settings, read once from ``RERANK_*`` environment variables (and an optional ``.env`` file).

Owns: every tunable with its unit in the name and a device-aware default. Does not know: how any of
them is used. ``.env.example`` documents every field, with its default (tests/service/test_config.py keeps the
two equal); the README explains the ones a caller's experience depends on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service import redis_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RERANK_", env_file=".env", extra="ignore", protected_namespaces=(),
                                      env_ignore_empty=True)

    # --- model
    model_dir: Path = Field(Path("models"), description="folder of model versions, or one version folder")
    model_version: str = Field("", description="version to serve; empty = newest manifest under model_dir")
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description=("auto = CUDA when onnxruntime-gpu can run it, else CPU; cuda = CUDA or the model is "
                             "refused (the service does not start, a reload answers 422); cpu = CPU"))
    intra_op_threads: int = Field(0, ge=0, description=(
        "ONNX Runtime threads per inference; 0 = the cores divided among the workers (ONNX Runtime's own default "
        "with one worker)"))

    # --- request limits
    default_k: int = Field(6, ge=1, description="items returned when the request gives no k")
    default_timeout_ms: float = Field(100.0, gt=0, description="deadline when the request gives no timeout_ms")
    max_timeout_ms: float = Field(10_000.0, gt=0, description="largest timeout_ms a request may ask for")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="larger bodies get 413")

    # --- batcher
    max_batch_size: int = Field(64, ge=1, description="requests per inference batch")
    max_batch_candidates: int = Field(64 * 50, ge=1, description="candidates (rows x list length) per batch")
    max_wait_ms: float = Field(0.0, ge=0, description=(
        "wait this long after a batch's first request for more; 0 = the batch is whatever queued while the "
        "previous one ran (measured best on CPU and on an H200 GPU; README, Batching)"))
    max_queue_size: int = Field(256, ge=1, description="queued requests before 429")
    inline_when_idle: bool = Field(False, description=(
        "with no other request in flight, nothing queued or running and max_wait_ms 0, run the model call on the "
        "event loop instead of handing it to the batch thread (off: no gain measured at one connection)"))
    batch_thread_nice: int = Field(0, ge=0, le=19, description=(
        "the batch thread's nice value above the event loop's (Linux): where they share a core the loop's reads, "
        "refusals and answers preempt inference, which shortens refusals when the worker has a core to itself but "
        "starves inference when a flood of refused clients keeps every loop busy (README, Overload)"))
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429")
    admission: Literal["deadline", "fixed"] = Field("deadline", description=(
        "deadline = admit a request when the wait Little's law predicts (requests in flight at the measured "
        "answer rate, plus event-loop lag) fits admission_deadline_share of its deadline, else 429; fixed = admit "
        "up to max_in_flight whatever the deadline (see service/admission.py)"))
    admission_deadline_share: float = Field(0.8, gt=0, le=1, description=(
        "share of a request's deadline its predicted wait may fill; the rest absorbs the spread around the mean "
        "wait Little's law predicts"))
    admission_window_s: float = Field(1.0, gt=0, description=(
        "the measured answer rate weighs the last this many seconds (exponentially)"))
    admission_hold_s: float = Field(10.0, gt=0, description=(
        "the rate admission uses is held at the highest measured lately, decaying with this time constant, so a "
        "flood of refused clients that slows every request cannot talk it down to refusing nearly all"))
    admission_door: Literal["auto", "asgi", "parser"] = Field("auto", description=(
        "where a refusal is answered: parser = from uvicorn's HTTP parser, without a task or the ASGI app, written "
        "for uvicorn 0.54 and 0.55 only (service/parser_door.py, with what it was measured to save); asgi = a "
        "middleware before routing (any uvicorn); auto = parser on a uvicorn it was written for, else asgi"))
    refusal_pause_ms: float = Field(0.0, ge=0, le=1000, description=(
        "while refusals outrun answers refusal_flood_ratio times over, a connection just refused 429 is not read "
        "for this long, so clients that send again at once cannot spin the event loop on refusals; a request sent "
        "on it meanwhile is judged as having waited the whole pause. Parser door only (the ASGI door cannot pause a "
        "connection); 0 = off (the default; 20 is what was measured, see README, Floods of refused clients)"))
    refusal_flood_ratio: float = Field(4.0, gt=0, description=(
        "refusals per second over the measured answer rate above which refused connections are paused"))
    max_in_flight: int = Field(256, ge=1, description=(
        "/rerank requests being answered at once by the whole service, a safety ceiling under the deadline rule "
        "or the limit itself with admission=fixed (each of N workers admits 1/N); more get 429 at once"))
    body_timeout_ms: float = Field(1000.0, gt=0, description=(
        "a /rerank body must arrive within this long, else 408; a request holds no admission slot meanwhile"))

    # --- features
    redis_url: str = Field("", description=(
        "redis://[:password@]host:port/db (rediss:// for TLS); redis+cluster://[:password@]host:port[,host:port...] "
        "for a Redis Cluster; redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db] for the master "
        "Sentinel reports (?sentinel_password=... when the sentinels require one); empty = no Redis"))
    redis_timeout_ms: float = Field(20.0, gt=0, description="per Redis call, then the feature falls back")
    redis_pool_size: int = Field(32, ge=1, description="Redis connections per process")
    feature_ttl_s: int = Field(24 * 3600, ge=1, description="TTL of feature keys written to Redis")
    local_cache_ttl_s: float = Field(30.0, ge=0, description="in-process feature cache TTL; 0 disables it")
    local_cache_size: int = Field(100_000, ge=0, description="in-process feature cache entries")
    breaker_failures: int = Field(3, ge=1, description="consecutive Redis failures that open the breaker")
    breaker_reset_s: float = Field(5.0, gt=0, description="open breaker waits this long before a trial call")

    # --- operations
    admin_token: str = Field("", description="bearer token for /admin/*; empty disables admin endpoints")
    drain_delay_s: float = Field(5.0, ge=0, le=60, description=(
        "after SIGTERM, keep serving with /readyz red this long before shutting down, so load balancers "
        "stop sending first"))
    workers: int = Field(0, ge=0, le=256, description=(
        "worker processes behind the one port, each with its own batcher and ONNX Runtime session; 0 = one per "
        "core this process may use, or with providers=cuda half of them, at most 8 (one GPU; see default_workers)"))
    host: str = Field("127.0.0.1", description="bind address for `python -m service`")
    port: int = Field(8000, ge=1, le=65535, description="bind port for `python -m service`")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description=(
        "text = one readable line per record (a terminal); json = one JSON object per line (ts, level, logger, msg, "
        "pid and the event's fields), uvicorn's own records included"))
    tracing: Literal["off", "otlp", "console"] = Field("off", description=(
        "OpenTelemetry spans per /rerank request (features, queue, model), continuing the caller's traceparent: "
        "otlp = OTLP over HTTP (OTEL_EXPORTER_OTLP_ENDPOINT), console = stdout; needs pip install '.[tracing]'"))
    tracing_sample_ratio: float = Field(1.0, ge=0, le=1, description=(
        "share of new traces sampled; a request with a traceparent follows its caller's decision"))
    request_log_dir: str = Field("", description=(
        "folder for the sampled request log, one requests-<pid>.jsonl per process (what was asked and answered, "
        "for training on your own traffic; README, Request log); empty = off"))
    request_log_sample: float = Field(0.01, ge=0, le=1, description="share of /rerank requests the request log keeps")
    request_log_max_mb: float = Field(64.0, gt=0, description="a request log file is rotated at this size")
    request_log_keep: int = Field(4, ge=0, description="rotated request log files kept per process (.1 is newest)")
    access_log: bool = Field(False, description=(
        "one event per /rerank request on the rerank.access logger: request_id, status, model_version, "
        "fallback_reason, candidates, total_ms, features_ms, batch_ms (queue_ms + model_ms), worker_pid (probes are "
        "not logged; 429s refused at the admission door carry door=true)"))
    access_log_sample: float = Field(1.0, gt=0, le=1, description=(
        "share of answers and 429 refusals the access log writes (at full load a line costs about 4% of a "
        "request's CPU); fallbacks and every other error are always written"))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return redis_url.check(value)

    @model_validator(mode="after")
    def _ranges(self) -> Settings:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(f"default_timeout_ms {self.default_timeout_ms} exceeds max_timeout_ms "
                             f"{self.max_timeout_ms}")
        return self

    def resolved_workers(self) -> int:
        """``workers``, or the default for the providers (``default_workers``)."""
        return self.workers or default_workers(self.providers)

    def resolved_intra_op_threads(self, workers: int) -> int:
        """``intra_op_threads``; with several workers and no setting, the cores divided among them (each
        ONNX Runtime session would otherwise start one thread per core, and N workers would oversubscribe)."""
        if self.intra_op_threads or workers <= 1:
            return self.intra_op_threads
        return max(1, usable_cores() // workers)


SECRET = frozenset({"redis_url", "admin_token"})  # settings whose values never go into a message


def refusals(exc: ValidationError) -> list[str]:
    """One line per refused setting, naming its variable and, unless it is a secret, the value given; pydantic's
    own text would print every input, passwords in a Redis URL included."""
    lines = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f"RERANK_{name.upper()}" if name else "settings"
        shown = "" if not name or name in SECRET else f"={error.get('input')!r}"
        lines.append(f"{where}{shown}: {error['msg']}")
    return lines


def default_workers(providers: str) -> int:
    """One worker per usable core on CPU. On one GPU, half the cores and at most 8: every worker is a CUDA
    context the GPU time-slices. On an H200 host with 16 cores, 16 workers served 17,184 req/s at 256 connections
    against 24,629 for 8, and 4,538 against 8,791 at 64 (one repeat of `python -m loadtest.gpu --providers cuda
    --workers 4,8,16 --concurrency 16,64,256 --repeats 1`); 4 workers were best at 16 and 64 connections."""
    cores = usable_cores()
    return max(1, min(8, cores // 2)) if providers == "cuda" else cores


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity (a container's cpuset), capped by a cgroup v2 CPU quota
    (a container's CPU limit, e.g. Kubernetes ``limits.cpu``: "200000 100000" is 2 cores), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))

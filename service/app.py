"""The HTTP surface: POST /rerank, /livez, /readyz, /metrics, POST /admin/reload.

Owns: the lifespan (model, Redis pool, feature store, batcher start and stop with it), request limits,
fallbacks, the atomic model swap, and mapping errors to HTTP in one place. Does not know: ONNX details
(``model.py``), batching policy (``batcher.py``), where features live (``features.py``) or how the
admission limit moves (``admission.py``).

The request path, top to bottom: ``Door`` (429 for a request that would miss its deadline, before the app;
service/server.py puts it in front) -> ``rerank`` (content type, body within ``body_timeout_ms``, parse and check,
admission against the body's own deadline and an in-flight slot) -> ``rank`` (features, the batcher under the
request's deadline, fallback) -> JSON. Handlers are module-level functions; each reads the ``Service`` built
by ``create_app`` (``service_of``) and, once the lifespan has opened them, its ``Runtime`` (``runtime_of``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import gc
import hmac
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route

from service import errors, logs, request_log
from service.admission import UNREAD_S, ASGIApp, Door, Gate, Headers, RefusalHook
from service.batcher import Batcher, BatcherClosed, BatchStats, DeadlineExceeded, QueueFull
from service.config import Settings
from service.features import CircuitBreaker, FeatureStore, make_redis, read_snapshot
from service.features import connect as connect_redis
from service.manifest import ModelError
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.model import Job, Ranked, RerankModel, UserFeatures, find_version
from service.request_log import RequestLog
from service.schemas import ErrorBody, FallbackReason, RerankRequest, RerankResponse, check_request, parse_request

if TYPE_CHECKING:
    from service.tracing import Tracing

log = logging.getLogger("rerank.app")
STARTUP_REDIS_S = 2.0  # how long start-up waits for Redis's first answer before serving without it
access_log = logging.getLogger(logs.ACCESS)
REQUEST_ID_HEADER = "x-request-id"  # a door refusal's request id (the body, which holds request_id, is never read)
Reloader = Callable[[str], Coroutine[Any, Any, dict[str, Any]]]  # version -> this worker's reload result


class Peers(Protocol):
    """The service's other worker processes, as the app needs them; service/workers.py implements it over the
    supervisor's pipe. ``start``: this worker serves, here is how to reload it; ``reload_all``: reload every
    worker, one result each; ``reloading``: a reload this worker asked for is under way."""

    @property
    def reloading(self) -> bool: ...

    def start(self, loop: asyncio.AbstractEventLoop, on_reload: Reloader) -> None: ...

    async def reload_all(self, version: str) -> list[dict[str, Any]]: ...


@dataclass
class Runtime:
    """What the lifespan opens and closes. Handlers read ``model`` once per use (a reload swaps it whole)."""

    model: RerankModel
    features: FeatureStore
    batcher: Batcher[tuple[RerankModel, Job], Ranked]
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Service:
    """One app's state: built by ``create_app``, its ``runtime`` set by the lifespan while it serves."""

    settings: Settings
    metrics: Metrics
    gate: Gate
    peers: Peers | None = None  # set in a worker process: reloads reach every worker (service/workers.py)
    runtime: Runtime | None = None
    draining: bool = False
    tracing: Tracing | None = None  # RERANK_TRACING (service/tracing.py); None: off, and that module never imported
    request_log: RequestLog | None = None  # RERANK_REQUEST_LOG_DIR (service/request_log.py); None: off


def service_of(request_or_app: Request | FastAPI) -> Service:
    app = request_or_app.app if isinstance(request_or_app, Request) else request_or_app
    return cast(Service, app.state.service)


def runtime_of(svc: Service) -> Runtime:
    if svc.runtime is None:
        raise errors.NotReady("the service is starting" if not svc.draining else "the service has stopped")
    return svc.runtime


def make_gate(settings: Settings, metrics: Metrics) -> Gate:
    return Gate(settings.max_in_flight, settings.retry_after_s, by_deadline=settings.admission == "deadline",
                deadline_share=settings.admission_deadline_share, window_s=settings.admission_window_s,
                hold_s=settings.admission_hold_s, flood_ratio=settings.refusal_flood_ratio,
                on_shed=lambda reason: metrics.rejections.labels(reason=reason).inc())


def load_model(folder: Path, settings: Settings) -> tuple[RerankModel, float]:
    """Validate, open and warm up a model version (blocking; run it in a thread)."""
    model = RerankModel(folder, settings.providers, settings.intra_op_threads)
    return model, model.warm_up()


def run_batch(jobs: list[tuple[RerankModel, Job]]) -> list[Ranked]:
    """The batcher's process function. Each job carries the model that was current when it arrived; a
    batch spanning a reload runs per model, so no request meets a vocabulary it was not checked against."""
    out: list[Ranked | None] = [None] * len(jobs)
    by_model: dict[int, list[int]] = {}
    for i, (model, _) in enumerate(jobs):
        by_model.setdefault(id(model), []).append(i)
    for rows in by_model.values():
        model = jobs[rows[0]][0]
        for row, ranked in zip(rows, model.rank([jobs[r][1] for r in rows]), strict=True):
            out[row] = ranked
    return [r for r in out if r is not None]


def freeze_heap() -> None:
    """Move everything alive now (modules, the model's maps, the snapshot) out of the collector's sight.

    A full collection walks every tracked object; with FastAPI, pydantic, numpy and onnxruntime loaded
    that took tens of milliseconds and set the p99 (measured at 16 connections: p99 72 ms with the
    default collector, 20 ms with it disabled). Frozen objects are never scanned; request garbage still is.
    """
    gc.collect()
    gc.freeze()


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``). After a reload the replaced ONNX
    Runtime session's memory is free but stays in the process, so RSS climbed about 40 MB over the first ten
    reloads before it levelled off (measured, 30 reloads); no-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def fallback_items(req: RerankRequest, k: int) -> list[dict[str, Any]]:
    """Retriever order: by descending retriever score, ties in request order."""
    order = sorted(range(len(req.candidates)), key=lambda i: -req.candidates[i].score)[:k]
    return [{"item_id": req.candidates[i].item_id, "score": req.candidates[i].score, "rank": r + 1}
            for r, i in enumerate(order)]


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them when Content-Length says so, and a
    sender that takes longer than ``timeout_s`` to send it (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise errors.MalformedJSON(f"Content-Length {declared!r} is not a number", "Content-Length", declared)
        if int(declared) > limit:
            raise errors.PayloadTooLarge(f"body of {declared} bytes exceeds {limit} bytes", "body", int(declared))
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise errors.PayloadTooLarge(f"body exceeds {limit} bytes", "body", len(body))
    except TimeoutError:
        raise errors.RequestTimeout(f"body not complete after {timeout_s * 1000:.0f} ms ({len(body)} bytes read)",
                                    "body_timeout_ms", round(timeout_s * 1000)) from None
    except ClientDisconnect:  # nobody to answer; say so in the logs and metrics, not as a 5xx
        raise errors.MalformedJSON("client disconnected before the body was complete", "body", len(body)) from None
    return bytes(body)


def begin_drain(app: FastAPI) -> None:
    """Readiness goes red; requests are still served normally (the batcher closes at shutdown)."""
    service_of(app).draining = True


# ------------------------------------------------------------------------------------------- lifespan


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc = service_of(app)
    settings, metrics = svc.settings, svc.metrics
    folder = find_version(settings.model_dir, settings.model_version)
    model, warm_s = await asyncio.to_thread(load_model, folder, settings)
    log.info("model %s from %s on %s, warmed up in %.2f s", model.version, folder, model.providers, warm_s)
    client = None
    if settings.redis_url:
        client = make_redis(settings.redis_url, settings.redis_pool_size, settings.redis_timeout_ms)
        await connect_redis(client, STARTUP_REDIS_S)
        log.info("user features: local cache -> Redis -> snapshot")
    else:
        log.warning("RERANK_REDIS_URL is empty: user features come from the in-process cache and the "
                    "model's snapshot only (not shared across replicas)")
    features = FeatureStore(client, timeout_ms=settings.redis_timeout_ms, ttl_s=settings.feature_ttl_s,
                            cache_size=settings.local_cache_size, cache_ttl_s=settings.local_cache_ttl_s,
                            breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s))
    features.set_snapshot(await asyncio.to_thread(read_snapshot, folder / "user_features.jsonl"))
    batcher: Batcher[tuple[RerankModel, Job], Ranked] = Batcher(
        run_batch, max_batch_size=settings.max_batch_size, max_batch_cost=settings.max_batch_candidates,
        max_wait_ms=settings.max_wait_ms, max_queue_size=settings.max_queue_size, on_batch=lambda s: on_batch(svc, s),
        inline_when_idle=settings.inline_when_idle, thread_nice=settings.batch_thread_nice)
    svc.runtime = Runtime(model, features, batcher)
    batcher.start()
    svc.gate.lag.start()
    metrics.set_model(model.version, model.providers)
    freeze_heap()
    if svc.peers is not None:
        svc.peers.start(asyncio.get_running_loop(), lambda version: reload_here(app, version))
    log.info("ready: max_batch_size %d, max_wait_ms %.1f, max_queue_size %d, admission %s (at most %d in flight)",
             settings.max_batch_size, settings.max_wait_ms, settings.max_queue_size, settings.admission,
             settings.max_in_flight)
    try:
        yield
    finally:
        svc.draining = True
        await svc.gate.lag.stop()
        await batcher.close()
        await features.close()
        if svc.tracing is not None:
            await asyncio.to_thread(svc.tracing.shutdown)
        if svc.request_log is not None:
            await asyncio.to_thread(svc.request_log.close)
        svc.runtime = None
        log.info("drained and stopped")


def on_batch(svc: Service, stats: BatchStats) -> None:
    metrics = svc.metrics
    if stats.expired:
        metrics.expired.inc(stats.expired)
    if stats.late:
        metrics.late_starts.inc(stats.late)
    if metrics.multiprocess and svc.runtime is not None:  # other workers' /metrics cannot ask this one
        publish_gauges(svc, svc.runtime)
    if stats.size:
        metrics.batch_size.observe(stats.size)
        metrics.inference_seconds.observe(stats.run_s)
        for wait in stats.queue_waits_s:
            metrics.queue_seconds.observe(wait)


def publish_gauges(svc: Service, runtime: Runtime) -> None:
    svc.metrics.queue_depth.set(runtime.batcher.depth)
    svc.metrics.breaker_open.set(0 if runtime.features.breaker.state == "closed" else 1)
    svc.metrics.admission_limit.set(svc.gate.capacity(svc.settings.default_timeout_ms / 1000.0))
    svc.metrics.admission_rate.set(svc.gate.rate.per_s or 0.0)
    svc.metrics.loop_lag.set(svc.gate.lag.lag_s)


# ------------------------------------------------------------------------------------------- /rerank


@dataclass(frozen=True)
class Answer:
    """What ``rank`` answered: the response, whether the deadline passed before the model answered, and what the
    access log and the trace record of it (moments on the monotonic clock)."""

    response: Response
    missed: bool
    request_id: str | None
    model_version: str
    fallback_reason: str | None
    candidates: int
    features_at: float  # the user-feature lookup began
    submitted_at: float  # handed to the batcher
    answered_at: float  # the batcher answered, or gave up
    model: Ranked | None  # its started and run_s time the model call; None for a fallback

    def stages_s(self) -> dict[str, float]:
        """Seconds per stage: features, batch (queue and model), and queue and model apart when the model ran."""
        out = {"features": self.submitted_at - self.features_at, "batch": self.answered_at - self.submitted_at}
        if self.model is not None and self.model.started:
            out |= {"queue": self.model.started - self.submitted_at, "model": self.model.run_s}
        return out


async def rerank(request: Request) -> Response:
    """Rerank the candidates; answers in retriever order with ``fallback: true`` if the model fails or the
    deadline passes first."""
    started = time.monotonic()  # the one arrival time: the handler's latency and the request's deadline count from it
    svc = service_of(request)
    try:
        answer = await admit_and_rank(svc, request, started)
    except errors.ServiceError as exc:
        ended = time.monotonic()
        svc.metrics.requests.labels(status=f"{exc.status // 100}xx").inc()
        svc.metrics.request_seconds.observe(ended - started)
        if logs_access(svc, always=exc.status != 429):
            access_log.info("rerank %d %s", exc.status, exc.code, extra={"event": logs.access_event(
                None, exc.status, ended - started, error=exc.code, field=exc.field)})
        if svc.tracing is not None:
            trace_refusal(svc.tracing, request, started, ended, exc)
        return errors.error_response(exc)
    ended = time.monotonic()
    svc.metrics.requests.labels(status="2xx").inc()
    svc.metrics.request_seconds.observe(ended - started)
    if logs_access(svc, always=answer.fallback_reason is not None):
        access_log.info("rerank 200 %s", answer.request_id, extra={"event": logs.access_event(
            answer.request_id, 200, ended - started, answer.model_version, answer.fallback_reason, answer.candidates,
            answer.stages_s())})
    if svc.tracing is not None:
        trace_answer(svc.tracing, request, started, ended, answer)
    return answer.response


def logs_access(svc: Service, always: bool) -> bool:
    """Whether this request gets an access line: never with the access log off; else when ``always`` (fallbacks,
    errors other than 429), and for the rest (answers, refusals) at the share ``access_log_sample``."""
    if not svc.settings.access_log:
        return False
    share = svc.settings.access_log_sample
    return always or share >= 1.0 or random.random() < share


def door_refusals(svc: Service) -> RefusalHook | None:
    """What the admission doors call with each 429 they answer before any handler: an access line (``door``: true,
    sampled like the handler's 429s) and an error span in the caller's trace. The body is never read there, so the
    request id is the caller's ``X-Request-Id`` header, if it sent one. None with the access log and tracing both
    off, so a refusal then costs nothing more."""
    if not svc.settings.access_log and svc.tracing is None:
        return None

    def refused(headers: Headers, took_s: float, exc: errors.Overloaded) -> None:
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
        request_id = carrier.get(REQUEST_ID_HEADER)
        if request_id is not None:
            request_id = errors.short(request_id)
        if logs_access(svc, always=False):
            access_log.info("rerank 429 %s", exc.code, extra={"event": logs.access_event(
                request_id, 429, took_s, error=exc.code, field=exc.field, door=True)})
        if svc.tracing is not None:
            from service.tracing import RequestTimes

            ended = time.monotonic()
            svc.tracing.record(carrier, RequestTimes(ended - took_s, ended, attributes={
                "http.response.status_code": 429, "rerank.error": exc.code, "rerank.error_field": exc.field or "",
                "rerank.door": True, "rerank.request_id": request_id or ""}), error=exc.code)

    return refused


def log_request(svc: Service, req: RerankRequest, k: int, version: str, items: list[dict[str, Any]],
                reason: str | None, features: UserFeatures, source: str) -> None:
    """The request, the features it was served with and its answer to the request log, if on and this request is
    sampled; never waits."""
    rlog = svc.request_log
    if rlog is None or not rlog.sampled():
        return
    entry = request_log.record(req.request_id, req.user_id, version, k,
                               [(c.item_id, c.score) for c in req.candidates], [i["item_id"] for i in items], reason,
                               time.time(), features.history, source)
    if not rlog.offer(entry):
        svc.metrics.request_log_dropped.inc()


def trace_answer(tracing: Tracing, request: Request, started: float, ended: float, answer: Answer) -> None:
    from service.tracing import RequestTimes

    model = answer.model
    ran = model is not None and model.started > 0
    run = (model.started, model.started + model.run_s) if model is not None and ran else (0.0, 0.0)
    attributes: dict[str, str | int | bool] = {
        "rerank.request_id": answer.request_id or "", "rerank.model_version": answer.model_version,
        "rerank.candidates": answer.candidates, "rerank.fallback": answer.fallback_reason is not None,
        "http.response.status_code": 200}
    if answer.fallback_reason is not None:
        attributes["rerank.fallback_reason"] = answer.fallback_reason
    queue = (answer.submitted_at, run[0]) if ran else (0.0, 0.0)
    tracing.record(request.headers, RequestTimes(started, ended, (answer.features_at, answer.submitted_at), queue,
                                                 run, dict(attributes)))


def trace_refusal(tracing: Tracing, request: Request, started: float, ended: float, exc: errors.ServiceError) -> None:
    from service.tracing import RequestTimes

    tracing.record(request.headers, RequestTimes(started, ended, attributes={
        "http.response.status_code": exc.status, "rerank.error": exc.code, "rerank.error_field": exc.field or ""}),
        error=exc.code)


async def admit_and_rank(svc: Service, request: Request, started: float) -> Answer:
    """Content type, body, parse and check, admission against the request's own deadline (the slot held until
    the answer), then ``rank``. ``started``: when the handler began (time.monotonic)."""
    settings, metrics, gate = svc.settings, svc.metrics, svc.gate
    gate.handler_started(request.scope)
    runtime = runtime_of(svc)
    # the deadline's clock: the handler's start, or earlier by the time the request may have waited unread on a
    # paused connection (service/parser_door.py)
    arrived = started - request.scope.get(UNREAD_S, 0.0)
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        metrics.rejections.labels(reason="content_type").inc()
        raise errors.UnsupportedMediaType(f"Content-Type must be application/json, got {ctype!r}", "Content-Type",
                                          ctype)
    model = runtime.model
    try:
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_ms / 1000.0)
        req = parse_request(body)
        k = check_request(req, model.max_candidates, model.score_range, settings.default_k, settings.max_timeout_ms)
    except errors.ServiceError as exc:
        metrics.rejections.labels(reason=exc.code).inc()
        raise
    deadline = arrived + (req.timeout_ms or settings.default_timeout_ms) / 1000.0
    refusal = gate.verdict(deadline - time.monotonic())
    if refusal is not None:  # the door let it in, and the wait grew while its body arrived, or its own deadline
        raise gate.refuse(refusal)  # is shorter than the one the door judged by
    gate.enter()
    answer = None
    try:
        answer = await rank(svc, runtime, model, req, k, deadline)
        return answer
    finally:
        gate.leave(answer is not None and answer.missed)


async def rank(svc: Service, runtime: Runtime, model: RerankModel, req: RerankRequest, k: int, deadline: float
               ) -> Answer:
    """Features, the batcher under ``deadline``, the answer (in retriever order if the model fails or is late), and
    whether the deadline passed before the model answered."""
    settings, metrics = svc.settings, svc.metrics
    t_feat = time.monotonic()
    features, source, redis_failed = await runtime.features.get(req.user_id)
    t_batch = time.monotonic()
    metrics.feature_seconds.observe(t_batch - t_feat)
    metrics.feature_lookups.labels(source=source).inc()
    if redis_failed:
        metrics.redis_errors.inc()
    if source == "cold_start":
        metrics.cold_start.inc()

    job = Job([c.item_id for c in req.candidates],
              np.fromiter((c.score for c in req.candidates), dtype=np.float32, count=len(req.candidates)),
              features, k)
    reason: FallbackReason = "model_error"
    ranked: Ranked | None = None
    budget = deadline - time.monotonic()
    try:
        alone = svc.gate.in_flight <= 1  # this request only: nothing else admitted
        ranked = await asyncio.wait_for(runtime.batcher.submit((model, job), deadline, cost=len(job.item_ids),
                                                               alone=alone), max(budget, 0.0))
    except QueueFull as exc:
        metrics.rejections.labels(reason="queue_full").inc()
        raise errors.Overloaded(f"{exc}; retry later", "queue", runtime.batcher.depth,
                                headers={"Retry-After": str(settings.retry_after_s)}) from None
    except (DeadlineExceeded, TimeoutError):
        reason = "deadline"
    except BatcherClosed:
        reason = "draining"
    except Exception:
        log.exception("inference failed for request %r", req.request_id)
        reason = "model_error"

    batch_s = time.monotonic() - t_batch
    if ranked is None:
        metrics.fallbacks.labels(reason=reason).inc()
        in_order = fallback_items(req, k)
        body = {"request_id": req.request_id, "model_version": model.version, "items": in_order,
                "fallback": True, "fallback_reason": reason}
        log_request(svc, req, k, model.version, in_order, reason, features, source)
        return Answer(json_response(body), reason == "deadline", req.request_id, model.version, reason,
                      len(req.candidates), t_feat, t_batch, t_batch + batch_s, None)
    if ranked.oov_items:
        metrics.oov_items.inc(ranked.oov_items)
    items = [{"item_id": job.item_ids[int(p)], "score": float(s), "rank": r + 1}
             for r, (p, s) in enumerate(zip(ranked.positions, ranked.logits, strict=True))]
    response = json_response({"request_id": req.request_id, "model_version": ranked.version, "items": items,
                              "fallback": False, "fallback_reason": None})
    log_request(svc, req, k, ranked.version, items, None, features, source)
    return Answer(response, False, req.request_id, ranked.version, None, len(req.candidates), t_feat, t_batch,
                  t_batch + batch_s, ranked)


# ------------------------------------------------------------------------------------------- probes and admin


async def livez(request: Request) -> Response:
    return json_response({"status": "alive"})


async def readyz(request: Request) -> Response:
    svc = service_of(request)
    if svc.runtime is None or svc.draining:
        return json_response({"status": "draining" if svc.draining else "starting"}, 503)
    return json_response({"status": "ready", "model_version": svc.runtime.model.version,
                          "providers": svc.runtime.model.providers, "pid": os.getpid()})


async def metrics_endpoint(request: Request) -> Response:
    svc = service_of(request)
    if svc.runtime is not None:
        publish_gauges(svc, svc.runtime)
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def admin_reload(request: Request, version: str = "") -> Response:
    """Load ``version`` (default: the newest under RERANK_MODEL_DIR), warm it up, swap atomically.
    A model that fails validation is refused and the current one keeps serving."""
    svc = service_of(request)
    settings = svc.settings
    if not settings.admin_token:
        raise errors.NotFound("admin endpoints are disabled (RERANK_ADMIN_TOKEN is empty)", "path",
                              request.url.path)
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
        raise errors.Unauthorized("missing or wrong bearer token", "Authorization", None)
    runtime = runtime_of(svc)
    if svc.peers is None:
        if runtime.reload_lock.locked():
            raise errors.Conflict("a reload is already in progress", "version", version)
        result = await reload_here(request.app, version)
        result.pop("pid")
        return json_response(result)
    if svc.peers.reloading:
        raise errors.Conflict("a reload is already in progress", "version", version)
    results = await svc.peers.reload_all(version)
    done = [r for r in results if "error" not in r]
    if not done:  # every worker refused it the same way: the request's fault, as with one worker
        raise errors.InvalidRequest(results[0]["error"], "version", version or str(settings.model_dir))
    if len(done) < len(results):
        failed = [r for r in results if "error" in r]
        log.error("reload reached %d of %d workers: %s", len(done), len(results), failed)
        raise errors.NotReady(f"reload reached {len(done)} of {len(results)} workers: {failed[0]['error']}",
                              "version", version or str(settings.model_dir))
    first = done[0]
    return json_response({"model_version": first["model_version"], "previous_version": first["previous_version"],
                          "providers": first["providers"], "warmup_s": max(r["warmup_s"] for r in done),
                          "workers": results})


async def reload_here(app: FastAPI, version: str) -> dict[str, Any]:
    """Load ``version`` in this process (default: the newest under RERANK_MODEL_DIR), warm it up, swap it in
    atomically. A model that fails validation is refused (InvalidRequest) and the current one serves on."""
    svc = service_of(app)
    settings, metrics = svc.settings, svc.metrics
    runtime = runtime_of(svc)
    async with runtime.reload_lock:
        try:
            folder = find_version(settings.model_dir, version)
            new, warm_s = await asyncio.to_thread(load_model, folder, settings)
            snapshot = await asyncio.to_thread(read_snapshot, folder / "user_features.jsonl")
        except (ModelError, OSError, ValueError, KeyError) as exc:
            metrics.reloads.labels(result="refused").inc()
            log.warning("reload refused, still serving %s: %s", runtime.model.version, exc)
            raise errors.InvalidRequest(f"model refused, still serving {runtime.model.version}: {exc}",
                                        "version", version or str(settings.model_dir)) from None
        previous = runtime.model.version
        runtime.model = new  # atomic: one attribute; requests already queued keep their own model
        app.openapi_schema = None  # its limits come from the model
        runtime.features.set_snapshot(snapshot)
        del snapshot
        freeze_heap()
        await asyncio.to_thread(trim_heap)
        metrics.set_model(new.version, new.providers)
        metrics.reloads.labels(result="ok").inc()
        log.info("reloaded %s -> %s (warm-up %.2f s)", previous, new.version, warm_s)
        return {"pid": os.getpid(), "model_version": new.version, "previous_version": previous,
                "providers": new.providers, "warmup_s": round(warm_s, 3)}


# ------------------------------------------------------------------------------------------- errors and schema


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``errors.py``'s one body: service errors, Starlette's 404/405, FastAPI's
    validation errors, and anything unexpected (500, logged)."""

    async def service_error(request: Request, exc: Exception) -> Response:
        return errors.error_response(cast(errors.ServiceError, exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = cast(HTTPException, exc).status_code
        cls = {404: errors.NotFound, 405: errors.MethodNotAllowed}.get(status, errors.InvalidRequest)
        return errors.error_response(cls(str(cast(HTTPException, exc).detail), "path", request.url.path))

    async def validation_error(request: Request, exc: Exception) -> Response:
        err = cast(RequestValidationError, exc).errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return errors.error_response(errors.InvalidRequest(f"{where}: {err.get('msg')}", where, err.get("input")))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return errors.error_response(errors.ServiceError("internal error"))

    app.add_exception_handler(errors.ServiceError, service_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def schemas_of(*models: type[BaseModel]) -> dict[str, Any]:
    """JSON schemas of ``models`` and every model they refer to, keyed by name, $refs into components."""
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def rerank_operation() -> dict[str, Any]:
    """/rerank's OpenAPI operation. The handler is a plain Starlette route that reads its own body (FastAPI's
    per-request dependency and response machinery cost ~30% of the event loop at 16 connections, py-spy), so
    FastAPI cannot describe it: it is written here from the same pydantic models."""
    def json_body(name: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}

    example = RerankRequest.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    errors_by_status = {400: "malformed JSON or Content-Length", 408: "body not complete in body_timeout_ms",
                        413: "body over max_body_bytes", 415: "not application/json",
                        422: "a field out of its contract", 429: "over capacity (Retry-After)",
                        503: "starting or stopped"}
    return {"summary": "Rerank", "operationId": "rerank",
            "description": "Rerank the candidates; answers in retriever order with `fallback: true` if the model "
                           "fails or the deadline passes first.",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/RerankRequest"}, "example": example}}},
            "responses": {"200": {"description": "the top k", "content": json_body("RerankResponse")},
                          **{str(code): {"description": why, "content": json_body("ErrorBody")}
                             for code, why in errors_by_status.items()}}}


def install_openapi(app: FastAPI) -> None:
    """/openapi.json with /rerank's operation and schemas added; the limits that depend on the served model (list
    length, score range) are filled in from it. A reload clears the cached document."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = default_openapi()
            doc["paths"] = {"/rerank": {"post": rerank_operation()}, **doc.get("paths", {})}
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(copy.deepcopy(schemas_of(RerankRequest, RerankResponse, ErrorBody)))
            svc = service_of(app)
            if svc.runtime is not None:
                low, high = svc.runtime.model.score_range
                schemas["Candidate"]["properties"]["score"].update({"minimum": low, "maximum": high})
                props = schemas["RerankRequest"]["properties"]
                props["candidates"]["maxItems"] = props["k"]["maximum"] = svc.runtime.model.max_candidates
                props["timeout_ms"]["maximum"] = svc.settings.max_timeout_ms
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, peers: Peers | None = None, tracing: Tracing | None = None
               ) -> FastAPI:
    """The app. ``peers`` (service/workers.py) is set in a worker process: /admin/reload then reaches every
    worker, and the worker tells the supervisor when it is ready. ``tracing``: the tracer to record /rerank with;
    None builds the one ``RERANK_TRACING`` asks for, if any."""
    settings = settings or Settings()
    if tracing is None and settings.tracing != "off":
        from service.tracing import from_settings  # the optional dependency, imported only when asked for

        tracing = from_settings(settings.tracing, settings.tracing_sample_ratio)
    metrics = Metrics()
    gate = make_gate(settings, metrics)
    # FastAPI's built-in OpenTelemetry hooks are off: this service exports Prometheus metrics, and the
    # per-request "is telemetry configured?" check cost ~4% of the event loop (py-spy, 16 connections).
    app = FastAPI(title="DNR reranking service", version="0.1.0", lifespan=lifespan,
                  description="Reranks a retriever's candidates with a Denoising Neural Reranker.",
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    request_log = None
    if settings.request_log_dir:
        request_log = RequestLog(Path(settings.request_log_dir), settings.request_log_sample,
                                 int(settings.request_log_max_mb * 1024 * 1024), settings.request_log_keep)
    app.state.service = Service(settings, metrics, gate, peers, tracing=tracing, request_log=request_log)
    install_error_handlers(app)
    install_openapi(app)
    app.router.routes.insert(0, Route("/rerank", rerank, methods=["POST"]))  # first: the hot path; rerank_operation()
    app.add_api_route("/livez", livez, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    app.add_api_route("/admin/reload", admin_reload, methods=["POST"])
    return app


@dataclass(frozen=True)
class Stack:
    """What a server runs (service/server.py): ``asgi``, the app behind its admission door; ``http``, the uvicorn
    HTTP protocol (the parser door's class, or "httptools"); ``on_drain``, for the first SIGTERM. ``app`` is the
    FastAPI app inside, whose state tests read."""

    app: FastAPI
    asgi: ASGIApp
    http: Any
    on_drain: Callable[[], None]


def create_stack(settings: Settings | None = None, peers: Peers | None = None, tracing: Tracing | None = None
                 ) -> Stack:
    """The app with the admission door in front (service/admission.py): by default answered from uvicorn's HTTP
    parser (service/parser_door.py), on the uvicorn releases it was written for, else, with a warning, from the
    ASGI middleware alone (``RERANK_ADMISSION_DOOR=asgi`` asks for that). The middleware wraps the app from
    outside, before FastAPI and Starlette's error middleware: measured with wrk against a gate held full,
    10,500-11,300 refusals/s that way against 8,100-8,400 as a Starlette middleware."""
    settings = settings or Settings()
    app = create_app(settings, peers, tracing)
    svc = service_of(app)
    default_budget_s = settings.default_timeout_ms / 1000.0
    http: Any = "httptools"
    if settings.admission_door != "asgi":
        from service.parser_door import UnsupportedUvicorn, parser_door

        try:
            http = parser_door(svc.gate, default_budget_s, svc.metrics.refusal_seconds.observe,
                               pause_s=settings.refusal_pause_ms / 1000.0, paused=svc.metrics.refusal_pauses.inc,
                               refused=door_refusals(svc))
        except UnsupportedUvicorn as exc:
            if settings.admission_door == "parser":
                raise
            log.warning("admission door: %s; refusing from the ASGI middleware instead", exc)
    door = Door(cast(ASGIApp, app), svc.gate, default_budget_s, observe=svc.metrics.refusal_seconds.observe,
                refused=door_refusals(svc))
    return Stack(app, door, http, lambda: begin_drain(app))

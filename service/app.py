"""The HTTP surface: POST /rerank, /livez, /readyz, /metrics, POST /admin/reload.

Owns: the lifespan (model, Redis pool, feature store, batcher start and stop with it), request limits,
fallbacks, the atomic model swap, and mapping errors to HTTP in one place. Does not know: ONNX details
(``model.py``), batching policy (``batcher.py``) or where features live (``features.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route

from service import errors
from service.admission import Gate
from service.batcher import Batcher, BatcherClosed, BatchStats, DeadlineExceeded, QueueFull
from service.config import Settings
from service.features import CircuitBreaker, FeatureStore, make_redis, read_snapshot
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.model import Job, ModelError, Ranked, RerankModel, find_version
from service.schemas import ErrorBody, RerankRequest, RerankResponse, check_request, parse_request

if TYPE_CHECKING:
    from service.workers import Peers

log = logging.getLogger("rerank.app")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 413, 415, 422, 429, 503)}


@dataclass
class State:
    """Everything the lifespan owns; handlers read ``model`` once per use (reload swaps it whole)."""

    settings: Settings
    metrics: Metrics
    features: FeatureStore
    model: RerankModel
    batcher: Batcher[tuple[RerankModel, Job], Ranked] | None = None
    ready: bool = False
    draining: bool = False
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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


def fallback_items(req: RerankRequest, k: int) -> list[dict[str, Any]]:
    """Retriever order: by descending retriever score, ties in request order."""
    order = sorted(range(len(req.candidates)), key=lambda i: -req.candidates[i].score)[:k]
    return [{"item_id": req.candidates[i].item_id, "score": req.candidates[i].score, "rank": r + 1}
            for r, i in enumerate(order)]


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them when Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise errors.MalformedJSON(f"Content-Length {declared!r} is not a number", "Content-Length", declared)
        if int(declared) > limit:
            raise errors.PayloadTooLarge(f"body of {declared} bytes exceeds {limit} bytes", "body", int(declared))
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise errors.PayloadTooLarge(f"body exceeds {limit} bytes", "body", len(body))
    except ClientDisconnect:  # nobody to answer; say so in the logs and metrics, not as a 5xx
        raise errors.MalformedJSON("client disconnected before the body was complete", "body", len(body)) from None
    return bytes(body)


def begin_drain(app: FastAPI) -> None:
    """Readiness goes red; requests are still served normally (the batcher closes at shutdown)."""
    state: State | None = getattr(app.state, "rerank", None)
    if state is not None:
        state.draining = True


def create_app(settings: Settings | None = None, peers: Peers | None = None) -> FastAPI:
    """The app. ``peers`` (service/workers.py) is set in a worker process: /admin/reload then reaches every
    worker, and the worker tells the supervisor when it is ready."""
    settings = settings or Settings()
    metrics = Metrics()
    gate = Gate(settings.max_in_flight, settings.retry_after_s,
                on_shed=metrics.rejections.labels(reason="in_flight").inc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        folder = find_version(settings.model_dir, settings.model_version)
        model, warm_s = await asyncio.to_thread(load_model, folder, settings)
        log.info("model %s from %s on %s, warmed up in %.2f s", model.version, folder, model.providers, warm_s)
        client = None
        if settings.redis_url:
            client = make_redis(settings.redis_url, settings.redis_pool_size, settings.redis_timeout_ms)
            log.info("user features: local cache -> Redis -> snapshot")
        else:
            log.warning("RERANK_REDIS_URL is empty: user features come from the in-process cache and the "
                        "model's snapshot only (not shared across replicas)")
        features = FeatureStore(client, timeout_ms=settings.redis_timeout_ms, ttl_s=settings.feature_ttl_s,
                                cache_size=settings.local_cache_size, cache_ttl_s=settings.local_cache_ttl_s,
                                breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s))
        features.set_snapshot(await asyncio.to_thread(read_snapshot, folder / "user_features.jsonl"))
        state = State(settings, metrics, features, model)

        def on_batch(stats: BatchStats) -> None:
            if stats.expired:
                metrics.expired.inc(stats.expired)
            if stats.late:
                metrics.late_starts.inc(stats.late)
            if metrics.multiprocess:  # other workers' /metrics cannot ask this one at scrape time
                metrics.queue_depth.set(state.batcher.depth if state.batcher is not None else 0)
                metrics.breaker_open.set(0 if features.breaker.state == "closed" else 1)
            if stats.size:
                metrics.batch_size.observe(stats.size)
                metrics.inference_seconds.observe(stats.run_s)
                for wait in stats.queue_waits_s:
                    metrics.queue_seconds.observe(wait)

        wait_ms = settings.resolved_max_wait_ms(model.on_gpu)
        state.batcher = Batcher(run_batch, max_batch_size=settings.max_batch_size,
                                max_batch_cost=settings.max_batch_candidates, max_wait_ms=wait_ms,
                                max_queue_size=settings.max_queue_size, on_batch=on_batch,
                                inline_when_idle=settings.inline_when_idle)
        state.batcher.start()
        metrics.set_model(model.version, model.providers)
        app.state.rerank = state
        freeze_heap()
        state.ready = True
        if peers is not None:
            peers.start(asyncio.get_running_loop(), lambda version: reload_here(state, version))
        log.info("ready: max_batch_size %d, max_wait_ms %.1f, max_queue_size %d", settings.max_batch_size,
                 wait_ms, settings.max_queue_size)
        try:
            yield
        finally:
            state.ready, state.draining = False, True
            await state.batcher.close()
            await features.close()
            log.info("drained and stopped")

    # FastAPI's built-in OpenTelemetry hooks are off: this service exports Prometheus metrics, and the
    # per-request "is telemetry configured?" check cost ~4% of the event loop (py-spy, 16 connections).
    app = FastAPI(title="DNR reranking service", version="0.1.0", lifespan=lifespan,
                  description="Reranks a retriever's candidates with a Denoising Neural Reranker.",
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.gate = gate  # python -m service hands it to uvicorn's protocol (service/admission.py)

    def state_of(request: Request) -> State:
        state: State | None = getattr(request.app.state, "rerank", None)
        if state is None or state.batcher is None:
            raise errors.NotReady("the service is starting")
        return state

    @app.exception_handler(errors.ServiceError)
    async def service_error(request: Request, exc: errors.ServiceError) -> Response:
        return errors.error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        cls = {404: errors.NotFound, 405: errors.MethodNotAllowed}.get(exc.status_code, errors.InvalidRequest)
        return errors.error_response(cls(str(exc.detail), "path", request.url.path))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return errors.error_response(errors.InvalidRequest(f"{where}: {err.get('msg')}", where, err.get("input")))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return errors.error_response(errors.ServiceError("internal error"))

    # The body is read by hand (see the plain Route below), so FastAPI does not know its model: the request
    # schema and the models it refers to go into components here, so every $ref in /openapi.json resolves.
    # The limits that depend on the served model (list length, score range) are filled in from it; a reload
    # clears the cached document.
    request_schema = RerankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request_defs = {"RerankRequest": request_schema, **request_schema.pop("$defs", {})}
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = default_openapi().setdefault("components", {}).setdefault("schemas", {})
            schemas.update(copy.deepcopy(request_defs))
            state: State | None = getattr(app.state, "rerank", None)
            if state is not None:
                low, high = state.model.score_range
                schemas["Candidate"]["properties"]["score"].update({"minimum": low, "maximum": high})
                props = schemas["RerankRequest"]["properties"]
                props["candidates"]["maxItems"] = props["k"]["maximum"] = state.model.max_candidates
                props["timeout_ms"]["maximum"] = settings.max_timeout_ms
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/RerankRequest"},
                  "example": RerankRequest.model_config["json_schema_extra"]["examples"][0]}}}})  # type: ignore[index]
    async def rerank(request: Request) -> Response:
        """Rerank the candidates; answers in retriever order with ``fallback: true`` if the model fails
        or the deadline passes first."""
        started = time.perf_counter()
        gate.enter(request.scope)
        try:
            if gate.over:  # the same limit SheddingProtocol holds at the door, for servers without it
                gate.on_shed()
                raise errors.Overloaded(gate.message(), "max_in_flight", gate.max_in_flight,
                                        headers={"Retry-After": str(settings.retry_after_s)})
            response = await _rerank(state_of(request), request, started)
        except errors.ServiceError as exc:
            metrics.requests.labels(status=f"{exc.status // 100}xx").inc()
            metrics.request_seconds.observe(time.perf_counter() - started)
            return errors.error_response(exc)
        finally:
            gate.leave()
        metrics.requests.labels(status="2xx").inc()
        metrics.request_seconds.observe(time.perf_counter() - started)
        return response

    # The same handler behind Starlette's plain Route, matched first: FastAPI's per-request dependency and
    # response machinery cost ~30% of the event loop at 16 connections (py-spy) for a handler that reads its
    # own body. The APIRoute above stays for the OpenAPI schema and /docs.
    app.router.routes.insert(0, Route("/rerank", rerank, methods=["POST"], include_in_schema=False))

    async def _rerank(state: State, request: Request, started: float) -> Response:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            metrics.rejections.labels(reason="content_type").inc()
            raise errors.UnsupportedMediaType(f"Content-Type must be application/json, got {ctype!r}",
                                              "Content-Type", ctype)
        try:
            body = await read_body(request, settings.max_body_bytes)
            req = parse_request(body)
            model = state.model
            k = check_request(req, model.max_candidates, model.score_range, settings.default_k,
                              settings.max_timeout_ms)
        except errors.ServiceError as exc:
            metrics.rejections.labels(reason=exc.code).inc()
            raise
        timeout_s = (req.timeout_ms or settings.default_timeout_ms) / 1000.0
        deadline = time.monotonic() - (time.perf_counter() - started) + timeout_s

        t_feat = time.perf_counter()
        features, source, redis_failed = await state.features.get(req.user_id)
        metrics.feature_seconds.observe(time.perf_counter() - t_feat)
        metrics.feature_lookups.labels(source=source).inc()
        if redis_failed:
            metrics.redis_errors.inc()
        if source == "cold_start":
            metrics.cold_start.inc()

        job = Job([c.item_id for c in req.candidates],
                  np.fromiter((c.score for c in req.candidates), dtype=np.float32, count=len(req.candidates)),
                  features, k)
        reason: str | None = None
        ranked: Ranked | None = None
        assert state.batcher is not None
        try:
            alone = gate.in_flight + gate.pending <= 1  # this request only: nothing else parsed or in flight
            ranked = await asyncio.wait_for(state.batcher.enqueue((model, job), deadline, cost=len(job.item_ids),
                                                                  alone=alone),
                                            max(deadline - time.monotonic(), 0.0))
        except QueueFull as exc:
            metrics.rejections.labels(reason="queue_full").inc()
            raise errors.Overloaded(f"{exc}; retry later", "queue", state.batcher.depth,
                                    headers={"Retry-After": str(settings.retry_after_s)}) from None
        except (DeadlineExceeded, TimeoutError):
            reason = "deadline"
        except BatcherClosed:
            reason = "draining"
        except Exception:
            log.exception("inference failed for request %r", req.request_id)
            reason = "model_error"

        if ranked is None:
            metrics.fallbacks.labels(reason=reason or "model_error").inc()
            return json_response({"request_id": req.request_id, "model_version": model.version,
                                  "items": fallback_items(req, k), "fallback": True, "fallback_reason": reason})
        if ranked.oov_items:
            metrics.oov_items.inc(ranked.oov_items)
        items = [{"item_id": job.item_ids[int(p)], "score": float(s), "rank": r + 1}
                 for r, (p, s) in enumerate(zip(ranked.positions, ranked.logits, strict=True))]
        return json_response({"request_id": req.request_id, "model_version": ranked.version, "items": items,
                              "fallback": False, "fallback_reason": None})

    @app.get("/livez")
    async def livez() -> Response:
        return json_response({"status": "alive"})

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        state: State | None = getattr(request.app.state, "rerank", None)
        if state is None or not state.ready or state.draining:
            status = "draining" if state is not None and state.draining else "starting"
            return json_response({"status": status}, 503)
        return json_response({"status": "ready", "model_version": state.model.version,
                              "providers": state.model.providers, "pid": os.getpid()})

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        state: State | None = getattr(request.app.state, "rerank", None)
        if state is not None and state.batcher is not None:
            metrics.queue_depth.set(state.batcher.depth)
            metrics.breaker_open.set(0 if state.features.breaker.state == "closed" else 1)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(request: Request, version: str = "") -> Response:
        """Load ``version`` (default: the newest under RERANK_MODEL_DIR), warm it up, swap atomically.
        A model that fails validation is refused and the current one keeps serving."""
        if not settings.admin_token:
            raise errors.NotFound("admin endpoints are disabled (RERANK_ADMIN_TOKEN is empty)", "path",
                                  request.url.path)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
            raise errors.Unauthorized("missing or wrong bearer token", "Authorization", None)
        state = state_of(request)
        if peers is None:
            if state.reload_lock.locked():
                raise errors.Conflict("a reload is already in progress", "version", version)
            result = await reload_here(state, version)
            result.pop("pid")
            return json_response(result)
        if peers.reloading:
            raise errors.Conflict("a reload is already in progress", "version", version)
        results = await peers.reload_all(version)
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

    async def reload_here(state: State, version: str) -> dict[str, Any]:
        """Load ``version`` in this process (default: the newest under RERANK_MODEL_DIR), warm it up, swap it
        in atomically. A model that fails validation is refused (InvalidRequest) and the current one serves on."""
        async with state.reload_lock:
            try:
                folder = find_version(settings.model_dir, version)
                new, warm_s = await asyncio.to_thread(load_model, folder, settings)
                snapshot = await asyncio.to_thread(read_snapshot, folder / "user_features.jsonl")
            except (ModelError, OSError, ValueError, KeyError) as exc:
                metrics.reloads.labels(result="refused").inc()
                log.warning("reload refused, still serving %s: %s", state.model.version, exc)
                raise errors.InvalidRequest(f"model refused, still serving {state.model.version}: {exc}",
                                            "version", version or str(settings.model_dir)) from None
            previous = state.model.version
            state.model = new  # atomic: one attribute; requests already queued keep their own model
            app.openapi_schema = None  # its limits come from the model
            freeze_heap()
            state.features.set_snapshot(snapshot)
            metrics.set_model(new.version, new.providers)
            metrics.reloads.labels(result="ok").inc()
            log.info("reloaded %s -> %s (warm-up %.2f s)", previous, new.version, warm_s)
            return {"pid": os.getpid(), "model_version": new.version, "previous_version": previous,
                    "providers": new.providers, "warmup_s": round(warm_s, 3)}

    return app

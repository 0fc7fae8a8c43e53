"""Every Prometheus metric the service exports, declared once.

Owns: names (``rerank_`` prefix, seconds, ``_total`` counters), labels (never user or item ids) and
buckets. Does not know: when they are observed.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Set by the worker supervisor (service/workers.py) before any worker imports prometheus_client: every worker
# then writes its samples to files there, and any worker's /metrics adds up all of them.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets from 0.1 ms to 2.5 s, dense below 10 ms where a reranker's p50/p99 live, so percentiles
# read off the histogram are accurate to a fraction of a millisecond.
SECONDS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.0035,
           0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05,
           0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app instance, so tests can build apps side by side; with several worker processes
    (``PROMETHEUS_MULTIPROC_DIR`` set) the samples go to shared files and ``exposition`` adds up every worker's,
    the way prometheus_client's multiprocess mode does: counters and histograms summed, the queue depth summed
    over live workers, the breaker and model version the maximum over live workers."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rerank_requests_total", "Answered /rerank requests by HTTP status class",
                                ["status"], registry=r)
        self.request_seconds = Histogram("rerank_request_duration_seconds", "Time in the /rerank handler",
                                         buckets=SECONDS, registry=r)
        self.feature_seconds = Histogram("rerank_feature_duration_seconds", "User feature lookup",
                                         buckets=SECONDS, registry=r)
        self.queue_seconds = Histogram("rerank_queue_wait_seconds", "Time from enqueue to batch start",
                                       buckets=SECONDS, registry=r)
        self.inference_seconds = Histogram("rerank_inference_duration_seconds",
                                           "One batch: encode + ONNX Runtime + top-k", buckets=SECONDS, registry=r)
        self.batch_size = Histogram("rerank_batch_size", "Requests per inference batch", buckets=BATCH_SIZES,
                                    registry=r)
        self.queue_depth = Gauge("rerank_queue_depth", "Requests waiting for a batch", registry=r,
                                 multiprocess_mode="livesum")
        self.feature_lookups = Counter("rerank_feature_lookups_total", "Which layer answered a feature lookup",
                                       ["source"], registry=r)
        self.redis_errors = Counter("rerank_redis_errors_total", "Failed or timed-out Redis calls", registry=r)
        self.breaker_open = Gauge("rerank_redis_breaker_open", "1 while the Redis circuit breaker is open",
                                  registry=r, multiprocess_mode="livemax")
        self.oov_items = Counter("rerank_oov_items_total", "Candidates unknown to the model", registry=r)
        self.cold_start = Counter("rerank_cold_start_users_total", "Requests for users with no features",
                                  registry=r)
        self.fallbacks = Counter("rerank_fallbacks_total", "Answers in retriever order", ["reason"], registry=r)
        self.rejections = Counter("rerank_rejections_total", "Requests refused", ["reason"], registry=r)
        self.expired = Counter("rerank_deadline_expired_total", "Requests dropped before the model (deadline)",
                               registry=r)
        self.late_starts = Counter("rerank_late_starts_total", "Requests dropped as their batch started in the "
                                   "worker thread: the deadline passed after batch collection", registry=r)
        self.admission_limit = Gauge("rerank_admission_limit", "Requests in flight admission would take now at the "
                                     "default deadline (summed over workers)", registry=r, multiprocess_mode="livesum")
        self.admission_rate = Gauge("rerank_admission_rate", "Answers per second of busy time that admission "
                                    "measured (summed over workers)", registry=r, multiprocess_mode="livesum")
        self.loop_lag = Gauge("rerank_event_loop_lag_seconds", "How late the event loop runs a 5 ms timer now "
                              "(worst worker)", registry=r, multiprocess_mode="livemax")
        self.refusal_seconds = Histogram("rerank_refusal_duration_seconds", "A 429 from the admission door: its time "
                                         "in the door plus the event-loop lag before it", buckets=SECONDS, registry=r)
        self.refusal_pauses = Counter("rerank_refusal_pauses_total", "Refused connections not read for "
                                      "RERANK_REFUSAL_PAUSE_MS because refusals flooded the worker", registry=r)
        self.request_log_dropped = Counter("rerank_request_log_dropped_total", "Sampled requests the request log "
                                           "dropped because its writer was behind (RERANK_REQUEST_LOG_DIR)",
                                           registry=r)
        # A gauge rather than an Info (which multiprocess mode cannot collect): 1 on the served version's labels.
        self.model_info = Gauge("rerank_model_info", "The model version being served (1)", ["providers", "version"],
                                registry=r, multiprocess_mode="livemax")
        self._model_labels: tuple[str, str] | None = None
        self.reloads = Counter("rerank_model_reloads_total", "Hot reload attempts", ["result"], registry=r)
        self.worker_restarts = Counter("rerank_worker_restarts_total", "Workers started again after one died "
                                       "(counted by the replacement)", registry=r)

    def set_model(self, version: str, providers: list[str]) -> None:
        """``rerank_model_info`` names ``version`` alone (the previous version's series drops to 0, or goes)."""
        labels = (",".join(providers), version)
        if self._model_labels is not None and self._model_labels != labels:
            if self.multiprocess:  # a file's series cannot be removed; 0 under livemax once no worker serves it
                self.model_info.labels(*self._model_labels).set(0)
            else:
                self.model_info.remove(*self._model_labels)
        self.model_info.labels(*labels).set(1)
        self._model_labels = labels

    def exposition(self) -> bytes:
        """The text /metrics answers: this registry, or every worker's samples in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "Metrics"]

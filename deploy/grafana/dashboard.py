"""Writes the provisioned Grafana dashboard of the service's metrics (``dashboards/rerank.json``).

    python deploy/grafana/dashboard.py          # regenerate after changing a panel

The panels live here as (title, unit, queries) so they are reviewable; ``tests/test_deploy.py`` checks the
JSON is this script's output and that every metric a query names is one the service exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RATE = "[$__rate_interval]"


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.99, 0.999)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{RATE})))", f"p{q * 100:g}") for q in qs]


# (title, unit, [(PromQL, legend)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Request rate by status", "reqps",
     [(f"sum by (status) (rate(rerank_requests_total{RATE}))", "{{status}}")], 8),
    ("Request latency (server side)", "s", quantiles("rerank_request_duration_seconds"), 8),
    ("Model version", "none", [("rerank_model_info", "{{version}} on {{providers}}")], 8),
    ("Inference latency per batch", "s", quantiles("rerank_inference_duration_seconds", (0.5, 0.99)), 8),
    ("Queue wait and feature lookup p99", "s",
     [(f"histogram_quantile(0.99, sum by (le) (rate(rerank_queue_wait_seconds_bucket{RATE})))", "queue wait p99"),
      (f"histogram_quantile(0.99, sum by (le) (rate(rerank_feature_duration_seconds_bucket{RATE})))",
       "feature lookup p99")], 8),
    ("Queue depth", "none", [("rerank_queue_depth", "queued requests")], 8),
    ("Batch size", "none",
     [(f"sum(rate(rerank_batch_size_sum{RATE})) / sum(rate(rerank_batch_size_count{RATE}))", "mean"),
      (f"histogram_quantile(0.99, sum by (le) (rate(rerank_batch_size_bucket{RATE})))", "p99")], 8),
    ("Feature cache hit ratio", "percentunit",
     [(f'sum(rate(rerank_feature_lookups_total{{source="local"}}{RATE})) / '
       f"sum(rate(rerank_feature_lookups_total{RATE}))", "in-process cache"),
      (f'sum(rate(rerank_feature_lookups_total{{source=~"local|redis"}}{RATE})) / '
       f"sum(rate(rerank_feature_lookups_total{RATE}))", "cache or Redis")], 8),
    ("Feature source", "reqps",
     [(f"sum by (source) (rate(rerank_feature_lookups_total{RATE}))", "{{source}}")], 8),
    ("Fallbacks by reason", "reqps",
     [(f"sum by (reason) (rate(rerank_fallbacks_total{RATE}))", "{{reason}}")], 8),
    ("Rejections by reason", "reqps",
     [(f"sum by (reason) (rate(rerank_rejections_total{RATE}))", "{{reason}}"),
      (f"rate(rerank_deadline_expired_total{RATE})", "deadline expired in queue")], 8),
    ("Redis", "none",
     [("rerank_redis_breaker_open", "breaker open"),
      (f"rate(rerank_redis_errors_total{RATE})", "errors/s")], 8),
    ("Cold-start users and unknown items", "reqps",
     [(f"rate(rerank_cold_start_users_total{RATE})", "cold-start users/s"),
      (f"rate(rerank_oov_items_total{RATE})", "unknown items/s")], 12),
    ("Model reloads", "none", [("sum by (result) (rerank_model_reloads_total)", "{{result}}")], 12),
]


def panel(i: int, title: str, unit: str, queries: list[tuple[str, str]], width: int, x: int, y: int
          ) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(queries)],
    }


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for i, (title, unit, queries, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(i, title, unit, queries, width, x, y))
        x += width
    return {"uid": "dnr-rerank", "title": "DNR reranking", "tags": ["rerank"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "refresh": "5s", "time": {"from": "now-15m", "to": "now"},
            "panels": panels}


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    out = Path(__file__).parent / "dashboards" / "rerank.json"
    out.write_text(render())
    print(f"wrote {out}")

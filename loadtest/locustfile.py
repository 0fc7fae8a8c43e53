"""Locust load test replaying realistic /rerank traffic from a model's held-out data.

    make loadtest SCENARIO=spike                    # against make serve on 127.0.0.1:8000
    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \
        --csv build/locust/steady --html build/locust/steady.html

Environment: LOCUST_SCENARIO (steady | ramp | spike, default steady), LOCUST_USERS (20), LOCUST_DURATION_S (60),
LOCUST_USER_RPS (requests per second per simulated user, 10), LOCUST_MODELS (models), LOCUST_COLD_SHARE (0.02).
A 429 or a 5xx is a failure; a fallback answer (200 in retriever order) is reported as a failure named by
its reason, so degraded answers are visible. Locust rounds times under 100 ms to whole milliseconds: read
precise latency from the service's own histograms (`/metrics`, `make bench`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, constant_throughput, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: locust imports this file alone
from loadtest.workload import Requests, schedule, stage_at

REQUESTS = Requests(Path(os.environ.get("LOCUST_MODELS", "models")),
                    cold_share=float(os.environ.get("LOCUST_COLD_SHARE", "0.02")))
STAGES = schedule(os.environ.get("LOCUST_SCENARIO", "steady"), int(os.environ.get("LOCUST_USERS", "20")),
                  float(os.environ.get("LOCUST_DURATION_S", "60")))


class Gateway(FastHttpUser):
    """A recommendation gateway: one /rerank per user request, at a steady per-user rate."""

    wait_time = constant_throughput(float(os.environ.get("LOCUST_USER_RPS", "10")))

    @task
    def rerank(self) -> None:
        with self.client.post("/rerank", json=REQUESTS.next(), catch_response=True, name="/rerank") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            body = resp.json()
            if body.get("fallback"):
                resp.failure(f"fallback: {body.get('fallback_reason')}")
            elif not body.get("items"):
                resp.failure("no items")


class Scenario(LoadTestShape):
    """The LOCUST_SCENARIO schedule (loadtest/workload.py)."""

    def tick(self) -> tuple[int, float] | None:
        stage = stage_at(STAGES, self.get_run_time())
        return None if stage is None else (stage.users, stage.spawn_rate)

"""The load-test and benchmark tooling: workload shapes, the timing wrapper, the comparison servers, a real
locust run against the real service, and the benchmark's arithmetic."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from loadtest import bench, workload
from loadtest.replay import quantile
from loadtest.servers import Timed, ceiling_app, naive_app
from tests.conftest import ServiceThread, service_settings

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- workload


def test_schedules() -> None:
    steady = workload.schedule("steady", 10, 60)
    assert [(s.until_s, s.users) for s in steady] == [(60, 10)]
    ramp = workload.schedule("ramp", 10, 50)
    assert [s.users for s in ramp] == [2, 4, 6, 8, 10] and ramp[-1].until_s == 50
    spike = workload.schedule("spike", 10, 50)
    assert [workload.stage_at(spike, t).users for t in (0, 19.9, 20, 29.9, 30, 49.9)] == [10, 10, 40, 40, 10, 10]
    assert workload.stage_at(spike, 50) is None
    with pytest.raises(ValueError, match="burst"):
        workload.schedule("burst", 10, 60)
    with pytest.raises(ValueError, match="users"):
        workload.schedule("steady", 0, 60)


def test_requests_are_real_lists_with_skewed_users(model_root: Path) -> None:
    heldout = workload.newest_heldout(model_root / "tiny-v1")
    rows = {json.loads(line)["request"]["user_id"]: json.loads(line)["request"]
            for line in heldout.read_text().splitlines()}
    reqs = workload.Requests(heldout, zipf_s=1.1, cold_share=0.1, seed=3)
    bodies = [reqs.next() for _ in range(3000)]
    assert len({b["request_id"] for b in bodies}) == 3000
    cold = [b for b in bodies if b["user_id"].startswith("cold-")]
    assert 0.05 < len(cold) / len(bodies) < 0.15
    warm = [b for b in bodies if not b["user_id"].startswith("cold-")]
    assert all(b["candidates"] == rows[b["user_id"]]["candidates"] for b in warm)
    counts = sorted(Counter(b["user_id"] for b in warm).values(), reverse=True)
    assert counts[0] > 5 * np.median(counts), "popularity must be skewed"


# ------------------------------------------------------------------------------------------- servers


def test_timed_records_only_rerank_posts_and_serves_samples() -> None:
    app = Timed(ceiling_app())
    with TestClient(app) as client:
        body = json.dumps({"request_id": "r", "user_id": "u", "candidates": [{"item_id": "1", "score": 0.5}]})
        for _ in range(3):
            assert client.post("/rerank", content=body, headers={"content-type": "application/json"}).status_code \
                == 200
        assert client.get("/readyz").status_code == 200
        got = client.get("/bench/latency?start=1").json()
    assert got["count"] == 3 and len(got["samples_s"]) == 2 and all(0 < s < 1 for s in got["samples_s"])


def test_naive_server_ranks_like_the_exported_model(model_root: Path) -> None:
    folder = model_root / "tiny-v1"
    rows = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()][:20]
    with TestClient(naive_app(folder)) as client:
        for row in rows:
            got = client.post("/rerank", json=row["request"]).json()
            assert [i["item_id"] for i in got["items"]] == row["offline_topk"]


# ---------------------------------------------------------------------------------------------- locust


def test_locust_steady_run_against_the_real_service(model_root: Path, tmp_path: Path) -> None:
    with ServiceThread(service_settings(model_root)) as svc:
        env = {**os.environ, "LOCUST_SCENARIO": "steady", "LOCUST_USERS": "4", "LOCUST_DURATION_S": "4",
               "LOCUST_MODELS": str(model_root / "tiny-v1"), "LOCUST_USER_RPS": "20"}
        proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
                               "--headless", "--host", svc.url, "--csv", str(tmp_path / "steady"),
                               "--html", str(tmp_path / "steady.html"), "--only-summary"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = {r["Name"]: r for r in csv.DictReader((tmp_path / "steady_stats.csv").read_text().splitlines())}
    assert int(stats["/rerank"]["Request Count"]) > 20
    assert int(stats["/rerank"]["Failure Count"]) == 0
    assert (tmp_path / "steady.html").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------- bench


def level(c: int, rps: float, p50: float, p99: float, statuses: dict[str, int] | None = None,
          client_p99: float | None = None) -> dict[str, Any]:
    return {"concurrency": c, "throughput_rps": rps, "p50_ms": p50, "p99_ms": p99,
            "client": {"p99_ms": client_p99 if client_p99 is not None else p99},
            "statuses": statuses or {"200": 100}}


def test_best_under_budget_ignores_slow_levels_and_errors() -> None:
    levels = [level(1, 100, 1, 2), level(4, 300, 3, 9), level(16, 500, 8, 30), level(8, 400, 5, 9.5, {"429": 3})]
    assert bench.best_under(levels)["concurrency"] == 4
    assert bench.best_under([level(1, 100, 20, 40)]) is None
    # A one-at-a-time server: fast once called, but requests queued in the socket wait far longer.
    assert bench.best_under([level(1, 200, 4, 6), level(8, 210, 4, 6, client_p99=45)])["concurrency"] == 1


def test_summary_targets() -> None:
    http = {"ceiling": [level(1, 2000, 0.3, 0.5), level(8, 5000, 1.0, 3.0)],
            "service": [level(1, 800, 1.0, 1.5), level(8, 2000, 3.0, 8.0)],
            "naive": [level(1, 200, 4.0, 6.0), level(8, 210, 30.0, 40.0)]}
    model = [{"batch": 1, "ort": {"p50_ms": 0.6}, "rank": {"p50_ms": 0.7}}]
    s = bench.summarise(http, model)
    assert s["service_vs_naive_throughput"] == 10.0
    assert s["c1_latency_bound_ms"] == pytest.approx(0.9)
    assert s["non_model_overhead_ms"] == pytest.approx(0.4)
    assert s["targets"] == {"throughput_vs_naive >= 3x": True, "c1 p50 <= 1.3 x (ceiling + model)": True,
                            "non-model overhead <= 0.3 ms": False}


def test_histogram_quantile_interpolates_the_delta() -> None:
    before = {0.001: 10.0, 0.002: 10.0, float("inf"): 10.0}
    after = {0.001: 10.0, 0.002: 110.0, float("inf"): 110.0}  # 100 new observations, all in (1, 2] ms
    assert quantile(before, after, 0.5) == pytest.approx(0.0015)
    assert quantile(before, after, 1.0) == pytest.approx(0.002)

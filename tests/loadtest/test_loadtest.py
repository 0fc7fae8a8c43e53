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

from loadtest import bench_report, heldout, workload
from loadtest.levels import best_under
from loadtest.scrape import Scrape, quantile
from loadtest.servers import Timed, ceiling_app, naive_app
from tests.conftest import ServiceThread, service_settings

ROOT = Path(__file__).resolve().parents[2]


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
    path = heldout.newest_heldout(model_root / "tiny-v1")
    rows = {json.loads(line)["request"]["user_id"]: json.loads(line)["request"]
            for line in path.read_text().splitlines()}
    reqs = workload.Requests(model_root / "tiny-v1", zipf_s=1.1, cold_share=0.1, seed=3)
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


@pytest.mark.slow
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


def level(target: str, c: int, rps: float, p99: float, non_2xx: int = 0, server_p99: float | None = None,
          cpu_us: float = 100.0, p50: float = 1.0, mean_batch: float | None = None) -> dict[str, Any]:
    row = {"target": target, "connections": c, "throughput_rps": rps, "p50_ms": p50, "p99_ms": p99,
           "requests": int(rps * 3), "non_2xx": non_2xx, "socket_errors": 0, "server_cpu_us_per_request": cpu_us}
    if server_p99 is not None:
        row |= {"server_p99_ms": server_p99, "mean_batch": mean_batch}
    return row


def test_best_under_budget_ignores_slow_levels_and_errors() -> None:
    levels = [level("s", 1, 100, 2), level("s", 4, 300, 9), level("s", 16, 500, 30), level("s", 8, 400, 9.5, 3)]
    assert best_under(levels)["connections"] == 4
    assert best_under([level("s", 1, 100, 40)]) is None
    # The server's own p99 counts too where it reports one.
    assert best_under([level("s", 1, 200, 6), level("s", 8, 210, 6, server_p99=12)])["connections"] == 1


def test_summary_spreads_over_repeats_and_checks_the_targets() -> None:
    model = [{"batch": 1, "ort": {"p50_ms": 0.2}, "rank_cpu_us_per_list": 200.0},
             {"batch": 4, "ort": {"p50_ms": 0.3}, "rank_cpu_us_per_list": 100.0}]

    def repeat(scale: float) -> dict[str, Any]:
        return {"open": [], "closed": [
            level("service x1", 1, 1000, 1.0, server_p99=0.8, cpu_us=400, p50=0.5, mean_batch=1.0),
            level("service x1", 16, 4000 * scale, 6.0, server_p99=5.0, cpu_us=300, mean_batch=4.0),
            level("service x2", 1, 1000, 1.0, server_p99=0.8, cpu_us=400, p50=0.5, mean_batch=1.0),
            level("service x2", 16, 7000 * scale, 7.0, server_p99=6.0, cpu_us=290, mean_batch=4.0),
            level("ceiling x1", 1, 5000, 0.5, cpu_us=150, p50=0.2),
            level("ceiling x1", 16, 9000, 3.0, cpu_us=140),
            level("ceiling x2", 1, 5000, 0.5, cpu_us=150, p50=0.2),
            level("ceiling x2", 16, 15000, 3.0, cpu_us=150),
            # refused half of 20,000/s (429 from admission): 10,000 2xx/s, which is not this target's peak
            level("service x1", 64, 20000, 50.0, non_2xx=30000, server_p99=40.0, cpu_us=100, mean_batch=8.0)]}

    s = bench_report.summarise([repeat(1.0), repeat(1.2), repeat(0.9)], model, workers=2)
    assert s["peak rps service x1"]["median"] == pytest.approx(10000.0)  # 2xx only
    assert s["rps service x2"] == {"median": 7000.0, "min": 6300.0, "max": 8400.0}
    assert s["speedup"]["median"] == pytest.approx(1.75)
    assert s["peak speedup ceiling"]["median"] == pytest.approx(15000 / 9000, abs=1e-3)
    # 290 us against the ceiling's 150 + the model's 100 at a mean batch of 4.
    assert s["cpu parts us service x2"]["median"] == pytest.approx(250.0)
    assert s["cpu ratio service x2"]["median"] == pytest.approx(1.16)
    assert s["c1 bound"]["median"] == pytest.approx(0.4) and s["c1 ratio"]["median"] == pytest.approx(1.25)
    assert list(s["targets"].values()) == [True, True, True]
    assert bench_report.model_cpu_us_per_list(model, 2.0) == pytest.approx(150.0)


def test_ab_compares_the_other_checkout_per_repeat_and_is_empty_without_it() -> None:
    def repeat(b_scale: float) -> dict[str, Any]:
        return {"open": [], "closed": [
            level("service x1", 4, 1000, 5.0), level("service x1", 16, 1500, 12.0),
            level("service x2", 4, 1800, 5.0),
            level("service-B x1", 4, 1000 * b_scale, 5.0),
            # B's 16-connection level misses the budget: it counts at peak only
            level("service-B x1", 16, 1300 * b_scale, 11.0),
            level("service-B x2", 4, 2000 * b_scale, 5.0)]}

    ab = bench_report.compare_ab([repeat(1.0), repeat(0.8), repeat(1.25)], workers=2)
    assert ab["rps service-B x1"] == {"median": 1000.0, "min": 800.0, "max": 1250.0}
    assert ab["ab ratio x1"] == {"median": 1.0, "min": 0.8, "max": 1.25}
    assert ab["ab peak ratio x1"]["median"] == pytest.approx(1500 / 1300, abs=1e-3)
    assert ab["ab ratio x2"]["median"] == pytest.approx(0.9)
    assert bench_report.compare_ab([{"open": [], "closed": [level("service x1", 4, 1000, 5.0)]}], workers=2) == {}


def test_histogram_quantile_interpolates_the_delta() -> None:
    before = {0.001: 10.0, 0.002: 10.0, float("inf"): 10.0}
    after = {0.001: 10.0, 0.002: 110.0, float("inf"): 110.0}  # 100 new observations, all in (1, 2] ms
    assert quantile(before, after, 0.5) == pytest.approx(0.0015)
    assert quantile(before, after, 1.0) == pytest.approx(0.002)


def test_admission_table_checks_refusals_where_littles_law_fits_and_speed_where_it_does_not() -> None:
    """One service target over two repeats: 1,000 model answers/s at 16 and 64 connections (16 and 64 ms of
    Little's-law wait, inside 100 ms), then 256 connections (256 ms: over) with many fast refusals."""
    def lv(conns: int, answers: int, refused: int, cpu_s: float, fallbacks: int = 0,
           refusal_p99: float | None = None) -> dict[str, Any]:
        return {"target": "service x1", "connections": conns, "requests": answers + refused, "non_2xx": refused,
                "answers": answers, "fallbacks": fallbacks, "wall_s": 1.0, "server_cpu_s": cpu_s,
                "model_answers_rps": float(answers - fallbacks), "refusal_p99_ms": refusal_p99}

    def repeat(good_64: int, refused_64: int) -> dict[str, Any]:
        return {"closed": [lv(16, 1000, 0, 0.5), lv(64, good_64, refused_64, 0.5),
                           lv(256, 1005, 20000, 1.5025, fallbacks=5, refusal_p99=2.0)]}

    rows = bench_report.admission([repeat(1000, 5), repeat(1000, 0)])
    by = {r["connections"]: r for r in rows}
    assert [by[c]["fits"] for c in (16, 64, 256)] == [True, True, False]
    assert by[64]["met"] and by[64]["refusals_per_answer"] == pytest.approx(0.0025)
    assert by[16]["cpu_us_per_answer"] == pytest.approx(500.0)  # 0.5 s of CPU over 1,000 answers
    # 1.5025 s of CPU, 1,005 answers at 500 us: the other 1 s over 20,000 refusals
    assert by[256]["cpu_us_per_refusal"] == pytest.approx(50.0) and by[256]["on_time"] == pytest.approx(1 - 5 / 1005)
    assert by[256]["met"]

    # refusing at 64 where it all fits: the old gate
    rows = bench_report.admission([repeat(300, 2000), repeat(310, 2100)])
    by = {r["connections"]: r for r in rows}
    assert not by[64]["met"] and not by[64]["goodput_held"]
    lines = bench_report.admission_lines(rows)
    assert any("| service x1 | 64 | 305 (300 to 310) |" in line and line.endswith("**no** |") for line in lines)


# ------------------------------------------------------------------------- held-out, client and scraper


def test_heldout_reader_gives_every_request_as_bytes_dicts_and_jobs(model_root: Path) -> None:
    folder = model_root / "tiny-v1"
    lines = (folder / "heldout.jsonl").read_text().splitlines()
    bodies, requests = heldout.bodies(folder), heldout.requests(folder)
    assert len(bodies) == len(requests) == len(lines)
    assert [json.loads(b) for b in bodies] == requests == [json.loads(line)["request"] for line in lines]
    jobs, labels = heldout.jobs(folder)
    assert [j.item_ids for j in jobs] == [[c["item_id"] for c in r["candidates"]] for r in requests]
    assert [len(z) for z in labels] == [len(r["candidates"]) for r in requests]
    with pytest.raises(FileNotFoundError, match="make model"):
        heldout.newest_heldout(model_root / "nothing-here")


def test_scrape_reads_the_services_own_exposition() -> None:
    from service.metrics import Metrics

    m = Metrics()
    m.requests.labels("2xx").inc(3)
    m.requests.labels("4xx").inc()
    m.fallbacks.labels("deadline").inc(2)
    for seconds in (0.0012, 0.0015, 0.2):
        m.request_seconds.observe(seconds)
    s = Scrape.parse(m.exposition().decode())
    assert s.total("rerank_requests_total") == 4 and s.total("rerank_requests_total", status="2xx") == 3
    assert s.total("rerank_fallbacks_total", reason="deadline") == 2 and s.total("rerank_fallbacks_total",
                                                                                  reason="draining") == 0
    buckets = s.histogram("rerank_request_duration_seconds")
    assert buckets[float("inf")] == 3 and list(buckets) == sorted(buckets)
    assert 0.001 < quantile({}, buckets, 0.5) <= 0.002


def test_load_client_closed_and_open_loop_against_the_real_service(model_root: Path) -> None:
    import asyncio

    from loadtest import client
    from loadtest.scrape import quantiles_ms, scrape

    bodies = heldout.bodies(model_root / "tiny-v1")
    with ServiceThread(service_settings(model_root)) as svc:
        before = scrape(svc.url)
        closed = asyncio.run(client.drive(svc.url, bodies, 3, requests=30))
        after = scrape(svc.url)
        # Open loop: request i is due at i / rate, so 0.3 s at 100/s sends exactly 30, spread over the window.
        opened = asyncio.run(client.drive(svc.url, bodies, 4, rate=100, duration_s=0.3))
    assert len(closed) == 30 and {r.status for r in closed} == {200} and all(r.latency_s > 0 for r in closed)
    assert after.total("rerank_requests_total", status="2xx") - before.total("rerank_requests_total") == 30
    assert quantiles_ms(before, after, "rerank_request_duration_seconds", (0.5,))["p50_ms"] > 0
    assert len(opened) == 30 and {r.status for r in opened} == {200}
    sent = sorted(r.sent for r in opened)
    assert sent[-1] - sent[0] >= 0.25


def test_a_synthetic_snapshot_is_pinned_in_the_manifest_and_loads(model_root: Path, tmp_path: Path) -> None:
    import shutil

    from loadtest import snapshot_memory
    from service.features import read_snapshot
    from service.model import RerankModel

    version = tmp_path / "tiny-v1"
    shutil.copytree(model_root / "tiny-v1", version)
    snapshot_memory.write_snapshot(version, 250)
    RerankModel(version, providers="cpu")  # the loader checks every file against the manifest's sha256
    snapshot = read_snapshot(version / "user_features.jsonl")
    items = set(json.loads((version / "items.json").read_text()))
    assert len(snapshot) == 250 and set(snapshot["s7"].history) <= items


def test_the_snapshot_memory_report_gives_each_workers_rss_and_their_mean() -> None:
    from loadtest import snapshot_memory

    text = snapshot_memory.render([("`a` (abc123 x)", [[118.0, 119.0], [150.4, 151.6]])], [0, 100_000], 2,
                                  "python -m loadtest.snapshot_memory --users 0,100000")
    assert "| `a` (abc123 x) | 118 (118, 119) | 151 (150, 152) |" in text
    assert "| service | 0 users | 100,000 users |" in text and "--users 0,100000`: 2 workers" in text


def test_the_tracing_cost_measure_prints_each_case(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import tracing_cost

    assert tracing_cost.main(["--records", "50", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sampled (ratio 1)", "sampled by the caller's traceparent",
                                                      "new traces at ratio 0.01"]
    assert all(float(line.split(": ")[1].split(" us")[0]) > 0 for line in lines)

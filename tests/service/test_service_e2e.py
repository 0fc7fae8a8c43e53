"""End to end over real HTTP (uvicorn on a free port) with a real redis-server and ONNX Runtime."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import RedisServer, ServiceThread, service_settings, slow_model


def heldout(model_root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()]


def test_online_top6_equals_offline_top6(model_root: Path, redis_server: RedisServer) -> None:
    """Every held-out test list: the service's top 6 is the offline evaluation's top 6, features from
    Redis (after the first pass backfills it) or the snapshot."""
    rows = heldout(model_root)
    settings = service_settings(model_root, redis_url=redis_server.url, local_cache_ttl_s=0)
    with ServiceThread(settings) as svc, httpx.Client(base_url=svc.url, timeout=10) as http:
        for attempt in ("snapshot", "redis"):
            mismatched = []
            for row in rows:
                r = http.post("/rerank", json=row["request"] | {"timeout_ms": 5000})
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["fallback"] is False
                if [i["item_id"] for i in out["items"]] != row["offline_topk"]:
                    mismatched.append(row["request"]["request_id"])
            assert mismatched == [], f"{attempt}: {len(mismatched)} of {len(rows)} lists differ"
        text = http.get("/metrics").text
        assert 'rerank_feature_lookups_total{source="redis"}' in text


async def _stream(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with sem:  # the deadline in the header too, as a caller with a long one sends it (README, Overload)
                return await client.post("/rerank", json=body, headers={"X-Timeout-Ms": str(body["timeout_ms"])})

        return await asyncio.gather(*(one(b) for b in bodies))


def test_hot_reload_during_a_stream_fails_no_request(model_root: Path) -> None:
    rows = heldout(model_root)
    bodies = [rows[i % len(rows)]["request"] | {"timeout_ms": 5000} for i in range(600)]
    auth = {"authorization": "Bearer test-token"}
    with ServiceThread(service_settings(model_root)) as svc, httpx.Client(base_url=svc.url, timeout=60) as http:

        async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
            stream = asyncio.create_task(_stream(svc.url, bodies, concurrency=8))
            await asyncio.sleep(0.2)
            reloads = []
            async with httpx.AsyncClient(base_url=svc.url, timeout=60) as admin:
                for version in ("tiny-v2", "tiny-v1", "tiny-v2"):
                    reloads.append(await admin.post(f"/admin/reload?version={version}", headers=auth))
            return await stream, reloads

        responses, reloads = asyncio.run(run())
        assert [r.status_code for r in reloads] == [200, 200, 200], [r.text for r in reloads]
        assert all(r.status_code == 200 for r in responses)
        assert not any(r.json()["fallback"] for r in responses)
        versions = {r.json()["model_version"] for r in responses}
        assert versions == {"tiny-v1", "tiny-v2"}, versions
        assert http.get("/readyz").json()["model_version"] == "tiny-v2"


def test_corrupted_or_missing_model_is_refused_and_the_old_one_keeps_serving(model_root: Path,
                                                                             tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_root / "tiny-v1", root / "tiny-v1")
    shutil.copytree(model_root / "tiny-v1", root / "tiny-bad")
    with open(root / "tiny-bad" / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    shutil.copytree(model_root / "tiny-v1", root / "tiny-wrong-format")
    manifest = json.loads((root / "tiny-wrong-format" / "manifest.json").read_text())
    manifest["format"] = "something-else/v9"
    (root / "tiny-wrong-format" / "manifest.json").write_text(json.dumps(manifest))
    body = heldout(model_root)[0]["request"] | {"timeout_ms": 5000}
    auth = {"authorization": "Bearer test-token"}
    with ServiceThread(service_settings(root)) as svc, httpx.Client(base_url=svc.url, timeout=60) as http:
        for version, reason in (("tiny-bad", "sha256 does not match"), ("tiny-wrong-format", "format"),
                                ("no-such-version", "no such model version")):
            r = http.post(f"/admin/reload?version={version}", headers=auth)
            assert r.status_code == 422 and reason in r.json()["error"]["message"], r.text
            served = http.post("/rerank", json=body)
            assert served.status_code == 200 and served.json()["model_version"] == "tiny-v1"
            assert served.json()["fallback"] is False
        assert 'rerank_model_reloads_total{result="refused"} 3.0' in http.get("/metrics").text


def test_overload_answers_429_with_retry_after(model_root: Path) -> None:
    settings = service_settings(model_root, max_queue_size=2, max_batch_size=1)
    bodies = [heldout(model_root)[0]["request"] | {"timeout_ms": 5000}] * 40
    with ServiceThread(settings) as svc:
        slow_model(svc, 0.05)
        responses = asyncio.run(_stream(svc.url, bodies, concurrency=40))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in rejected)
    assert all(not r.json()["fallback"] for r in responses if r.status_code == 200)


def test_service_starts_and_serves_without_redis(model_root: Path) -> None:
    with ServiceThread(service_settings(model_root)) as svc, \
            httpx.Client(base_url=svc.url, timeout=10) as http:
        assert http.get("/readyz").status_code == 200
        r = http.post("/rerank", json=heldout(model_root)[1]["request"] | {"timeout_ms": 5000})
        assert r.status_code == 200 and not r.json()["fallback"]


def metric_value(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_redis_killed_and_restarted_under_requests(model_root: Path, redis_server: RedisServer) -> None:
    """Every request is answered by the model while Redis dies and comes back; the breaker opens and closes."""
    rows = heldout(model_root)
    settings = service_settings(model_root, redis_url=redis_server.url, local_cache_ttl_s=0, breaker_failures=2,
                                breaker_reset_s=0.3, redis_timeout_ms=50)
    with ServiceThread(settings) as svc, httpx.Client(base_url=svc.url, timeout=10) as http:

        def burst(n: int) -> list[httpx.Response]:
            return [http.post("/rerank", json=rows[i % len(rows)]["request"] | {"timeout_ms": 5000})
                    for i in range(n)]

        assert all(r.status_code == 200 and not r.json()["fallback"] for r in burst(20))
        redis_server.stop()
        down = burst(30)
        assert all(r.status_code == 200 and not r.json()["fallback"] for r in down)
        assert metric_value(http, "rerank_redis_breaker_open") == 1.0
        assert metric_value(http, "rerank_redis_errors_total") >= 2
        redis_server.start()
        time.sleep(0.4)
        deadline = time.monotonic() + 10
        while metric_value(http, "rerank_redis_breaker_open") != 0.0 and time.monotonic() < deadline:
            assert all(r.status_code == 200 for r in burst(5))
            time.sleep(0.1)
        assert metric_value(http, "rerank_redis_breaker_open") == 0.0
        up = burst(20)
        assert all(r.status_code == 200 and not r.json()["fallback"] for r in up)

"""Several worker processes behind one port (RERANK_WORKERS=2), as real processes on loopback: metrics add up
over the workers, a reload reaches every worker (and a worker started later), one that dies is replaced."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.procs import ServiceProcess, ready_pids

pytestmark = pytest.mark.slow  # real processes

TOKEN = "workers-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def bodies(model_root: Path) -> list[dict[str, Any]]:
    rows = (model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["request"] | {"timeout_ms": 5000} for line in rows]


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def fresh() -> httpx.Client:
    """A client that opens a new connection per request, so the kernel spreads requests over the workers."""
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


@pytest.fixture
def two_workers(model_root: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess({"RERANK_MODEL_DIR": str(model_root), "RERANK_MODEL_VERSION": "tiny-v1",
                          "RERANK_WORKERS": "2", "RERANK_ADMIN_TOKEN": TOKEN, "RERANK_DRAIN_DELAY_S": "0",
                          "RERANK_REDIS_URL": "", "RERANK_LOG_LEVEL": "info"}, log=tmp_path / "service.log")
    with svc:
        yield svc


def test_metrics_of_every_worker_add_up_once(two_workers: ServiceProcess, model_root: Path) -> None:
    url = two_workers.url
    assert len(ready_pids(url, 2, 10)) == 2 and len(two_workers.pids()) == 2
    requests = bodies(model_root)[:30]
    with fresh() as http:
        for body in requests:
            assert http.post(f"{url}/rerank", json=body).status_code == 200
        for _ in range(5):
            assert http.post(f"{url}/rerank", json={"user_id": "u1"}).status_code == 422
        scrapes = [http.get(f"{url}/metrics").text for _ in range(6)]  # answered by either worker
    for text in scrapes:
        assert sample(text, "rerank_requests_total", '{status="2xx"}') == len(requests)
        assert sample(text, "rerank_requests_total", '{status="4xx"}') == 5
        assert sample(text, "rerank_request_duration_seconds_count") == len(requests) + 5
        assert sample(text, "rerank_batch_size_sum") == len(requests)  # every served request ran in one batch
        assert sample(text, "rerank_model_info", '{providers="CPUExecutionProvider",version="tiny-v1"}') == 1


def test_a_reload_reaches_every_worker_and_a_replacement_worker(two_workers: ServiceProcess, model_root: Path
                                                                ) -> None:
    url = two_workers.url
    with fresh() as http:
        r = http.post(f"{url}/admin/reload", params={"version": "tiny-v2"}, headers=AUTH)
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["model_version"] == "tiny-v2" and result["previous_version"] == "tiny-v1"
        assert sorted(w["pid"] for w in result["workers"]) == sorted(two_workers.pids())
        assert all(w["model_version"] == "tiny-v2" for w in result["workers"])
        served = {http.post(f"{url}/rerank", json=body).json()["model_version"] for body in bodies(model_root)[:20]}
        assert served == {"tiny-v2"}
        text = http.get(f"{url}/metrics").text
        assert sample(text, "rerank_model_info", '{providers="CPUExecutionProvider",version="tiny-v2"}') == 1
        assert sample(text, "rerank_model_info", '{providers="CPUExecutionProvider",version="tiny-v1"}') == 0
        assert sample(text, "rerank_model_reloads_total", '{result="ok"}') == 2  # once per worker

        # A version every worker refuses: 422 naming it, and both keep serving tiny-v2.
        bad = http.post(f"{url}/admin/reload", params={"version": "no-such"}, headers=AUTH)
        assert bad.status_code == 422 and bad.json()["error"]["value"] == "no-such"

        # A worker that dies is replaced, and the replacement serves the version every worker reloaded to.
        victim = two_workers.pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            pids = ready_pids(url, 2, 2)
            if len(pids) == 2 and victim not in pids:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {pids}"
        versions = {http.get(f"{url}/readyz").json()["model_version"] for _ in range(20)}
        assert versions == {"tiny-v2"}
        assert sample(http.get(f"{url}/metrics").text, "rerank_worker_restarts_total") == 1  # the replacement
    assert two_workers.proc is not None and two_workers.proc.poll() is None


def test_a_second_service_on_the_same_port_stops_instead_of_sharing_it(two_workers: ServiceProcess,
                                                                      tmp_path: Path) -> None:
    """Workers bind with SO_REUSEPORT; without the supervisor's check a second instance would join the port."""
    log = tmp_path / "second.log"
    with log.open("w") as out:
        second = subprocess.Popen([sys.executable, "-m", "service"], env=two_workers.env, stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            code = second.wait(timeout=60)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    assert code == 1 and "cannot serve on" in log.read_text(), log.read_text()

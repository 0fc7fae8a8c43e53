"""SIGTERM on the real `python -m service` process under a stream of requests, with one worker and with two:
readiness goes red first (on every worker), every request sent is answered by the model, and the process exits
within the drain delay plus a margin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadtest.procs import ready_pids
from tests.conftest import free_port


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_turns_readiness_red_first_and_fails_no_request(model_root: Path, workers: int) -> None:
    port, delay_s = free_port(), 1.5
    env = {**os.environ, "RERANK_MODEL_DIR": str(model_root), "RERANK_MODEL_VERSION": "tiny-v1",
           "RERANK_PORT": str(port), "RERANK_REDIS_URL": "", "RERANK_DRAIN_DELAY_S": str(delay_s),
           "RERANK_LOG_LEVEL": "warning", "RERANK_WORKERS": str(workers)}
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env)
    url = f"http://127.0.0.1:{port}"
    body = json.loads((model_root / "tiny-v1" / "heldout.jsonl").read_text().splitlines()[0])["request"] | {
        "timeout_ms": 5000}
    answers: list[tuple[float, int, bool]] = []  # (time sent, status, fallback)
    errors: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(f"{url}/rerank", json=body)
                    answers.append((sent, r.status_code, bool(r.json().get("fallback"))))
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    try:
        deadline = time.monotonic() + 60
        while len(ready_pids(url, workers, 1.0)) < workers:
            assert proc.poll() is None, "the service exited during start-up"
            assert time.monotonic() < deadline, "the service never became ready"
        # One keep-alive connection per stream; with two workers, enough streams that both get some.
        loaders = [threading.Thread(target=stream, daemon=True) for _ in range(1 if workers == 1 else 6)]
        for loader in loaders:
            loader.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        red = None
        while time.monotonic() - signalled < delay_s / 2:
            ready = httpx.get(f"{url}/readyz", timeout=1)
            if ready.status_code == 503:
                assert ready.json()["status"] == "draining"
                red = time.monotonic()
                break
            time.sleep(0.02)
        assert red is not None and red - signalled < delay_s, "readiness was not red while still serving"
        with httpx.Client(timeout=1, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            assert {fresh.get(f"{url}/readyz").status_code for _ in range(10)} == {503}  # every worker
        time.sleep(delay_s / 3)
        stop.set()  # a load balancer has stopped sending by now
        for loader in loaders:
            loader.join(timeout=10)
        code = proc.wait(timeout=delay_s + 15)
        gone = time.monotonic()
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not errors, errors[:3]
    assert answers and all(status == 200 and not fallback for _, status, fallback in answers)
    served_while_red = [a for a in answers if a[0] > red]
    assert served_while_red, "no request was served after readiness turned red"
    assert code in (0, -signal.SIGTERM), code  # uvicorn re-raises the captured signal after a clean shutdown
    assert delay_s - 0.2 <= gone - signalled <= delay_s + 10

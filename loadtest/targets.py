"""The servers a benchmark drives: the service (``python -m service``, this or another checkout) or the HTTP
ceiling (``loadtest/servers.py``), with N processes, up and ready; and a loopback Redis holding the snapshot.

Owns: starting and stopping them, their pids and CPU. Does not know: how they are loaded or measured.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.procs import RedisServer, ServiceProcess, cpu_seconds, free_port, load_features


@dataclass
class Target:
    """One server configuration under test: the service or the ceiling, with ``workers`` processes."""

    kind: str
    workers: int
    tag: str = ""  # tells apart two configurations of one kind ("cuda", "cpu"; "B" for --compare)
    cwd: Path | None = None  # the checkout whose service runs (None: this one)
    url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    service: ServiceProcess | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}{'-' + self.tag if self.tag else ''} x{self.workers}"

    def pids(self) -> list[int]:
        if self.service is not None:
            return sorted({self.service.pid, *self.service.pids()})
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())


@contextlib.contextmanager
def started(target: Target, folder: Path, redis_url: str, log: Path, env: dict[str, str] | None = None
            ) -> Iterator[Target]:
    """The target's processes, up and ready; the service gets ``env`` on top of the bench's settings."""
    if target.kind == "service":
        svc = ServiceProcess({"RERANK_MODEL_DIR": str(folder.resolve()), "RERANK_WORKERS": str(target.workers),
                              "RERANK_REDIS_URL": redis_url, "RERANK_LOG_LEVEL": "warning",
                              "RERANK_DRAIN_DELAY_S": "0", **(env or {})}, log=log, cwd=target.cwd)
        with svc:
            target.service, target.url = svc, svc.url
            yield target
        return
    with _ceiling(target, log):
        yield target


@contextlib.contextmanager
def _ceiling(target: Target, log: Path) -> Iterator[None]:
    """``target.workers`` copies of the HTTP ceiling on one SO_REUSEPORT port, ready."""
    port = free_port()
    target.url = f"http://127.0.0.1:{port}"
    out = log.open("ab")
    target.procs = [subprocess.Popen([sys.executable, "-m", "loadtest.servers", target.kind, "--port", str(port),
                                      "--reuse-port", "--bare"], stdout=out, stderr=out)
                    for _ in range(target.workers)]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert all(p.poll() is None for p in target.procs), f"{target.name} exited (log: {log})"
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{target.url}/readyz", timeout=1).status == 200:
                    break
            assert time.monotonic() < deadline, f"{target.name} not ready"
            time.sleep(0.1)
        time.sleep(1.0)  # the other copies import the same modules a moment later
        yield
    finally:
        for p in target.procs:
            p.send_signal(signal.SIGTERM)
        for p in target.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        out.close()


@contextlib.contextmanager
def redis(folder: Path) -> Iterator[str]:
    """A loopback redis-server loaded with the model's feature snapshot; empty URL when none is installed."""
    if shutil.which("redis-server") is None:
        print("redis-server not found: the service runs on its in-process cache and snapshot", flush=True)
        yield ""
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            load_features(server.url, {"RERANK_MODEL_DIR": str(folder)})
            yield server.url
        finally:
            server.stop()

"""Several worker processes behind one port, each with its own event loop, batcher and ONNX Runtime session.

Owns: spawning ``RERANK_WORKERS`` workers (each binds the port with SO_REUSEPORT, so the kernel spreads
connections over them), restarting a worker that dies after it was ready, stopping everything when one fails
before it was ready (a bad model or a taken port would fail every restart), forwarding SIGTERM / SIGINT so every
worker drains, the shared Prometheus folder, and the control channel that takes a reload to every worker.
Does not know: routes, models or batching (``app.py``), or how one process serves (``server.py``).

Control channel: one duplex pipe per worker. A worker asked for ``POST /admin/reload`` sends ("reload", token,
version) to the supervisor, which sends ("reload", token, version) to every worker (the asking one too), collects
each worker's ("reloaded", token, result) and answers the asking worker with ("result", token, results). Reloads
are serialised by the supervisor, so every worker ends on the same version; a worker started later (a restart)
loads the last version every worker reloaded to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from service import logs
from service.config import Settings
from service.metrics import MULTIPROC_ENV
from service.server import GRACEFUL_SHUTDOWN_S

if TYPE_CHECKING:  # the supervisor process never imports the app
    from service.app import Reloader

log = logging.getLogger("service.workers")
RELOAD_TIMEOUT_S = 300.0  # every worker loads, validates and warms the new version up in this long
PR_SET_PDEATHSIG = 1
Message = tuple[Any, ...]


# ------------------------------------------------------------------------------------------ in the worker


class PipePeers:
    """A worker's end of the control channel (``service.app.Peers`` over the supervisor's pipe): ask for a reload
    of every worker, and apply the reloads the supervisor sends (on the worker's event loop, through
    ``on_reload``, which the app sets when it is ready)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.on_reload: Reloader | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[list[dict[str, Any]]]] = {}

    def start(self, loop: asyncio.AbstractEventLoop, on_reload: Reloader) -> None:
        """Called by the app once it serves: answer the supervisor from now on, and tell it this worker is ready."""
        self.loop, self.on_reload = loop, on_reload
        threading.Thread(target=self._listen, name="peers", daemon=True).start()
        self._send(("ready", os.getpid()))

    async def reload_all(self, version: str) -> list[dict[str, Any]]:
        """Reload ``version`` in every worker; one result per worker (``error`` set where it was refused)."""
        assert self.loop is not None
        token = next(self._tokens)
        future: asyncio.Future[list[dict[str, Any]]] = self.loop.create_future()
        self._waiting[token] = future
        try:
            self._send(("reload", token, version))
            return await asyncio.wait_for(future, RELOAD_TIMEOUT_S + 10)
        finally:
            self._waiting.pop(token, None)

    @property
    def reloading(self) -> bool:
        """This worker is waiting for a reload of every worker it asked for."""
        return bool(self._waiting)

    def _send(self, message: Message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _listen(self) -> None:
        assert self.loop is not None
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the supervisor is gone: drain and stop rather than serve alone
                log.error("supervisor gone; shutting down")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if message[0] == "reload":
                _, token, version = message
                self._send(("reloaded", token, self._apply(version)))
            elif message[0] == "result":
                _, token, results = message
                future = self._waiting.get(token)
                if future is not None:
                    self.loop.call_soon_threadsafe(_resolve, future, results)

    def _apply(self, version: str) -> dict[str, Any]:
        assert self.loop is not None and self.on_reload is not None
        try:
            return asyncio.run_coroutine_threadsafe(self.on_reload(version), self.loop).result(RELOAD_TIMEOUT_S)
        except Exception as exc:  # the worker answers for itself; the supervisor reports it
            return {"pid": os.getpid(), "error": str(exc) or type(exc).__name__}


def _resolve(future: asyncio.Future[list[dict[str, Any]]], results: list[dict[str, Any]]) -> None:
    if not future.done():
        future.set_result(results)


def worker_main(index: int, conn: Connection, workers: int, version: str, replacing: bool = False) -> None:
    """A worker process: its own app (model, batcher, Redis pool) on its own SO_REUSEPORT socket. ``replacing``:
    it replaces one that died, and counts itself in ``rerank_worker_restarts_total``."""
    die_with_parent()
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    settings = worker_settings(settings, workers, version)
    from service.app import create_stack, service_of
    from service.server import reuse_port_socket, serve

    sock = reuse_port_socket(settings.host, settings.port)
    log.info("worker %d (pid %d) on %s:%d, %d ONNX Runtime threads", index, os.getpid(), settings.host,
             settings.port, settings.intra_op_threads)
    stack = create_stack(settings, peers=PipePeers(conn))
    if replacing:
        service_of(stack.app).metrics.worker_restarts.inc()
    serve(stack, settings, sockets=[sock])


def worker_settings(settings: Settings, workers: int, version: str) -> Settings:
    """One worker's settings: its share of the cores for ONNX Runtime, its share of the service's in-flight
    ceiling, and the version every worker last reloaded to, if any."""
    update: dict[str, Any] = {"intra_op_threads": settings.resolved_intra_op_threads(workers),
                              "max_in_flight": -(-settings.max_in_flight // workers)}
    if version:
        update["model_version"] = version
    return settings.model_copy(update=update)


def die_with_parent() -> None:
    """SIGTERM this process (so it drains) when the supervisor dies, even if it is killed (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# ------------------------------------------------------------------------------------------ the supervisor


@dataclass
class Worker:
    index: int
    process: SpawnProcess
    conn: Connection
    ready: bool = False


class Supervisor:
    """Starts ``workers`` worker processes, keeps them alive, forwards signals and carries reloads."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings, self.count = settings, workers
        self.workers: list[Worker] = []
        self.stopping = False
        self.failed = False
        self.version = ""  # the version every worker reloaded to last; restarts load it
        self.context = multiprocessing.get_context("spawn")
        self.metrics_dir: Path | None = None
        self.backlog: list[tuple[Worker, Message]] = []  # messages that arrived while a reload was collected
        self.tokens = itertools.count(1)

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT and every worker has drained; 0, or 1 if a worker failed to start."""
        try:  # each worker binds with SO_REUSEPORT, which would share the port with another instance silently
            port_is_free(self.settings.host, self.settings.port)
        except OSError as exc:
            log.error("cannot serve on %s:%d: %s", self.settings.host, self.settings.port, exc)
            return 1
        self._metrics_folder()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("supervisor (pid %d): %d workers on %s:%d", os.getpid(), self.count, self.settings.host,
                     self.settings.port)
            for index in range(self.count):
                self.workers.append(self._spawn(index))
            self._loop()
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return 1 if self.failed else 0

    def _metrics_folder(self) -> None:
        """A fresh folder for the workers' metric files (an existing PROMETHEUS_MULTIPROC_DIR is emptied)."""
        given = os.environ.get(MULTIPROC_ENV)
        if given:
            folder = Path(given)
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.db"):
                stale.unlink()
        else:
            folder = self.metrics_dir = Path(tempfile.mkdtemp(prefix="rerank-metrics-"))
        os.environ[MULTIPROC_ENV] = str(folder)

    def _spawn(self, index: int, replacing: bool = False) -> Worker:
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(target=worker_main, args=(index, child, self.count, self.version, replacing),
                                       name=f"rerank-worker-{index}", daemon=False)
        process.start()
        child.close()
        return Worker(index, process, parent)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        """Forward at once (each worker turns /readyz red and drains on its own); a second signal too, which
        makes the workers skip the rest of their drain delay."""
        self.stopping = True
        for worker in self.workers:
            if worker.process.pid is not None and worker.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)

    def _loop(self) -> None:
        while not self.stopping:
            if self.backlog:
                self._handle(*self.backlog.pop(0))
                continue
            ready = wait([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers], timeout=0.5)
            for worker in list(self.workers):
                if worker.process.sentinel in ready:
                    self._exited(worker)
                elif worker.conn in ready and (message := self._recv(worker)) is not None:
                    self._handle(worker, message)
                if self.stopping:
                    return

    def _recv(self, worker: Worker) -> Message | None:
        try:
            message: Message = worker.conn.recv()
            return message
        except (EOFError, OSError):
            return None  # it is exiting; its sentinel says so next

    def _handle(self, worker: Worker, message: Message) -> None:
        if message[0] == "ready":
            worker.ready = True
            log.info("worker %d (pid %s) ready", worker.index, message[1])
        elif message[0] == "reload":
            _, token, version = message
            results = self._reload_all(version)
            with contextlib.suppress(OSError):
                worker.conn.send(("result", token, results))

    def _reload_all(self, version: str) -> list[dict[str, Any]]:
        """Every live worker reloads ``version`` at once; their results, in worker order."""
        token = next(self.tokens)
        asked = [w for w in self.workers if w.process.exitcode is None]
        for w in asked:
            with contextlib.suppress(OSError):
                w.conn.send(("reload", token, version))
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while len(results) < len(asked) and time.monotonic() < deadline and not self.stopping:
            left = [w for w in asked if w.index not in results]
            for conn in wait([w.conn for w in left] + [w.process.sentinel for w in left], timeout=0.5):
                w = next(w for w in left if conn in (w.conn, w.process.sentinel))
                reply = self._recv(w) if conn is w.conn else None
                if reply is None:
                    if w.process.exitcode is not None or conn is not w.conn:
                        results[w.index] = {"pid": w.process.pid, "error": "the worker exited during the reload"}
                elif reply[0] == "reloaded" and reply[1] == token:
                    results[w.index] = reply[2]
                else:
                    self.backlog.append((w, reply))
        for w in asked:
            results.setdefault(w.index, {"pid": w.process.pid, "error": "no answer in time"})
        ordered = [results[w.index] for w in asked]
        if all("error" not in r for r in ordered):
            self.version = str(ordered[0]["model_version"])
        return ordered

    def _exited(self, worker: Worker) -> None:
        worker.process.join()
        _mark_dead(worker.process.pid)
        self.workers.remove(worker)
        worker.conn.close()
        if self.stopping:
            return
        if not worker.ready:
            log.error("worker %d exited (code %s) before it was ready; stopping", worker.index,
                      worker.process.exitcode)
            self.failed = self.stopping = True
            self._on_signal(signal.SIGTERM, None)
            return
        log.error("worker %d (pid %s) exited with code %s; starting another", worker.index, worker.process.pid,
                  worker.process.exitcode)
        self.workers.append(self._spawn(worker.index, replacing=True))

    def _stop_all(self) -> None:
        """Wait for every worker to drain; kill what is still running after the drain and grace periods."""
        deadline = time.monotonic() + self.settings.drain_delay_s + GRACEFUL_SHUTDOWN_S + 10
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join()
            _mark_dead(worker.process.pid)
        log.info("all workers stopped")


def port_is_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when something listens on ``host:port``: a plain bind fails against any
    listener there, SO_REUSEPORT ones included, so a second service on the same port stops instead of sharing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges (queue depth, breaker, model version) from the shared metrics."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

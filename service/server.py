"""One serving process: uvicorn with a drain phase.

Owns: the uvicorn configuration the service runs under (here, in the workers and in the tests), the drain on
SIGTERM, and serving one app on a given socket. Does not know: routes, models, or how many processes serve.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from service.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

# After the drain delay, in-flight requests get this long to finish (deploy/ grace periods are longer than
# the drain delay plus this).
GRACEFUL_SHUTDOWN_S = 30
log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase. On the first SIGTERM or SIGINT readiness goes red at once (``on_drain``)
    while requests keep being served for ``delay_s``, so load balancers stop sending before the socket
    closes; then uvicorn's graceful shutdown stops accepting and lets in-flight requests finish. A second
    signal skips the rest of the delay."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], delay_s: float) -> None:
        super().__init__(config)
        self.on_drain, self.delay_s = on_drain, delay_s
        self.timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.timer is None:
            self.on_drain()
            if self.delay_s > 0:
                log.info("signal %d: /readyz is red; serving %.1f s more, then shutting down", sig, self.delay_s)
                self.timer = threading.Timer(self.delay_s, super().handle_exit, (sig, frame))
                self.timer.daemon = True
                self.timer.start()
                return
        elif self.timer.is_alive():
            self.timer.cancel()
        super().handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How the service runs under uvicorn, here and in the tests: the admission door (service/admission.py) in
    front of the app, httptools' C parser (by default its subclass in service/parser_door.py, which refuses from the
    parser, on the uvicorn releases it was written for; ``RERANK_ADMISSION_DOOR=asgi`` for the plain one), no access
    log (the service's own metrics count every request), no proxy-header
    rewriting (nothing reads the client's address), and a bounded graceful shutdown.

    The door wraps the app from outside, before FastAPI, Starlette's error middleware and uvicorn's proxy-header
    middleware: measured with wrk against a gate held full, 10,500-11,300 refusals/s that way against 8,100-8,400
    as a Starlette middleware."""
    from service.admission import Door
    from service.app import service_of

    svc = service_of(app)
    default_budget_s = settings.default_timeout_ms / 1000.0
    http: Any = "httptools"
    if settings.admission_door != "asgi":
        from service.parser_door import UnsupportedUvicorn, parser_door

        try:
            http = parser_door(svc.gate, default_budget_s, svc.metrics.refusal_seconds.observe,
                               pause_s=settings.refusal_pause_ms / 1000.0, paused=svc.metrics.refusal_pauses.inc)
        except UnsupportedUvicorn as exc:
            if settings.admission_door == "parser":
                raise
            log.warning("admission door: %s; refusing from the ASGI middleware instead", exc)
    door = Door(app, svc.gate, default_budget_s, observe=svc.metrics.refusal_seconds.observe)
    return uvicorn.Config(door, host=settings.host, port=settings.port, log_level=settings.log_level,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False, http=http,
                          proxy_headers=False)


def reuse_port_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket on ``host:port`` with SO_REUSEPORT: every worker binds its own, and the kernel
    spreads new connections over them (a shared socket lets whichever worker wakes first take them all)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def serve_app(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then drain (blocking)."""
    from service.app import begin_drain

    server = DrainingServer(uvicorn_config(app, settings), lambda: begin_drain(app), settings.drain_delay_s)
    server.run(sockets=sockets)

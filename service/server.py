"""One serving process: uvicorn with a drain phase.

Owns: the uvicorn configuration the service runs under (here, in the workers and in the tests), the drain on
SIGTERM, and serving one ``Servable`` (an ASGI app, its HTTP protocol and a drain hook) on a given socket. Does
not know: the app, its state, routes, models, or how many processes serve.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import uvicorn

from service.config import Settings

# After the drain delay, in-flight requests get this long to finish (deploy/ grace periods are longer than
# the drain delay plus this).
GRACEFUL_SHUTDOWN_S = 30
log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase. On the first SIGTERM or SIGINT readiness goes red at once (``on_drain``)
    while requests keep being served for ``delay_s``, so load balancers stop sending before the socket
    closes; then uvicorn's graceful shutdown stops accepting and lets in-flight requests finish. A second
    signal skips the rest of the delay.

    The signal handler only sets fields: a signal can land while the main thread holds a lock, and a handler that
    takes the same lock never returns. One that cancelled a ``threading.Timer`` did exactly that when a third
    signal landed inside the second's ``cancel``: the worker hung with its port open after its supervisor was gone
    (found by ``make faults``' worker_kill). uvicorn's tick (every 0.1 s on the event loop) ends the drain and
    logs it."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], delay_s: float) -> None:
        super().__init__(config)
        self.on_drain, self.delay_s = on_drain, delay_s
        self.drain_signal: int | None = None  # the first SIGTERM or SIGINT, while its drain delay runs
        self.drain_until = 0.0  # time.monotonic() when the drain delay ends
        self.drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_drain()
        if self.drain_signal is None and self.delay_s > 0:
            self.drain_until = time.monotonic() + self.delay_s
            self.drain_signal = sig
            return
        super().handle_exit(sig, frame)  # lock-free: appends the signal and sets should_exit or force_exit

    async def on_tick(self, counter: int) -> bool:
        if self.drain_signal is not None and not self.should_exit:
            if not self.drain_logged:
                self.drain_logged = True
                log.info("signal %d: /readyz is red; serving %.1f s more, then shutting down", self.drain_signal,
                         max(0.0, self.drain_until - time.monotonic()))
            if time.monotonic() >= self.drain_until:
                super().handle_exit(self.drain_signal, None)
        return await super().on_tick(counter)


class Servable(Protocol):
    """An ASGI app as this module serves it (service/app.py's ``Stack`` is one): the callable, the uvicorn HTTP
    protocol to parse with, and what to call on the first SIGTERM."""

    @property
    def asgi(self) -> Any: ...

    @property
    def http(self) -> Any: ...

    @property
    def on_drain(self) -> Callable[[], None]: ...


def uvicorn_config(stack: Servable, settings: Settings) -> uvicorn.Config:
    """How the service runs under uvicorn, here and in the tests: the stack's app and HTTP protocol, no uvicorn
    access log (the service's own, ``RERANK_ACCESS_LOG``, says more), uvicorn's records handed to the root logger
    (``service/logs.py`` formats them like the service's own), no proxy-header rewriting (nothing reads the
    client's address), and a bounded graceful shutdown."""
    return uvicorn.Config(stack.asgi, host=settings.host, port=settings.port, log_level=settings.log_level,
                          log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False,
                          http=stack.http, proxy_headers=False)


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


def serve(stack: Servable, settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Serve ``stack`` until SIGTERM or SIGINT, then drain (blocking)."""
    server = DrainingServer(uvicorn_config(stack, settings), stack.on_drain, settings.drain_delay_s)
    server.run(sockets=sockets)

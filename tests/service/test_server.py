"""The drain on SIGTERM as the signal handler and uvicorn's tick share it: the handler only sets fields (no thread,
no lock, so a signal landing inside another handler cannot hang the process), and the tick ends the drain."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import uvicorn

from service.server import DrainingServer


def server(delay_s: float) -> tuple[DrainingServer, list[int]]:
    drained: list[int] = []
    return DrainingServer(uvicorn.Config(app=lambda *a: None), lambda: drained.append(1), delay_s), drained


def tick(srv: DrainingServer) -> bool:
    return asyncio.run(srv.on_tick(1))  # not a multiple of 10: uvicorn's header refresh needs a loaded config


def test_the_first_signal_drains_and_the_tick_ends_the_drain_when_its_delay_is_over() -> None:
    srv, drained = server(5.0)
    threads = threading.active_count()
    srv.handle_exit(signal.SIGTERM, None)
    assert drained == [1] and not srv.should_exit and threading.active_count() == threads  # no timer thread
    assert tick(srv) is False and srv.drain_logged  # still serving, readiness red
    srv.drain_until = time.monotonic() - 0.01
    assert tick(srv) is True and srv.should_exit and not srv.force_exit


def test_signals_during_the_drain_end_it_at_once_even_inside_another_handler() -> None:
    srv, _ = server(5.0)

    def nested(sig: int, depth: int) -> None:
        """A signal handler interrupted by the next signal, as Python runs them: inside the previous one."""
        srv.on_drain = (lambda: nested(sig, depth - 1)) if depth else (lambda: None)
        DrainingServer.handle_exit(srv, sig, None)

    srv.handle_exit(signal.SIGTERM, None)
    nested(signal.SIGTERM, 2)  # the second signal, with a third landing inside it
    assert srv.should_exit and tick(srv) is True


def test_no_drain_delay_exits_on_the_first_signal() -> None:
    srv, drained = server(0.0)
    srv.handle_exit(signal.SIGTERM, None)
    assert drained == [1] and srv.should_exit and tick(srv) is True

"""Admission: which /rerank requests to take, by whether each can still be answered within its deadline.

Owns: the in-flight count, the measured service rate, the event-loop lag probe, the admission rule, and the
door: a pure ASGI middleware that answers 429 before the app routes or reads the body. Does not know: models,
features, the batcher or the HTTP server underneath (any ASGI server works; no uvicorn internals).

The rule (``admission=deadline``, the default): a request is admitted when the wait it would see fits the share
``deadline_share`` of its deadline. The wait is predicted by Little's law: the requests ahead of it (in flight,
or admitted at a door and not yet at their handler) plus itself, served at the rate this process measurably
completes them while busy (``BusyRate``: departures per second of time with at least one request in flight,
weighted over the last ``window_s`` and held at the highest such rate of the last ``hold_s``), plus the event
loop's current lag (``LagProbe``: how late a periodic timer fires), which is the time a request spends before
the handler that no in-flight count sees. An idle process always admits (the request then answers on time or
falls back to retriever order: nothing to gain by a retry), so does one that has not measured a rate yet, and
nothing is admitted past ``ceiling`` requests in flight, a safety bound. ``admission=fixed`` admits up to
``ceiling`` in flight and ignores deadlines.

The deadline: ``timeout_ms`` in the body, which the door cannot read without parsing it. The door judges by the
``X-Timeout-Ms`` header when the caller sends one, else by the service's default; the handler judges again with
the body's own ``timeout_ms`` once it has the body, and takes the slot then. A client that trickles its body
holds no slot meanwhile (the app bounds how long it may take, ``RERANK_BODY_TIMEOUT_MS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

from service.errors import Overloaded, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Clock = Callable[[], float]
Headers = Iterable[tuple[bytes, bytes]]
# what a door calls with each 429 it answers before any handler runs: the request's headers (lower-case names), the
# seconds the refusal took at the door, and the refusal; the app's access log and tracing (service/app.py)
RefusalHook = Callable[[Headers, float, Overloaded], None]

ARRIVING = "rerank.arriving"  # scope key: a door admitted this request and its handler has not counted it yet
# scope key: seconds the request may have waited unread before the server saw it (a paused connection, see
# service/parser_door.py), charged to its deadline by the door and the handler alike
UNREAD_S = "rerank.unread_s"
TIMEOUT_HEADER = b"x-timeout-ms"  # the request's deadline in ms, for the door (the body's timeout_ms wins later)
MIN_BUSY_S = 0.02  # busy time (in the rate's window) before a measured rate is trusted
# Each lag reading moves the estimate by 1 - LAG_KEEP: a loop that stays late shows within a few 5 ms readings, while
# one stall (a reload's heap freeze) does not refuse the requests that arrive once it is over.
LAG_KEEP = 0.7
# A refused request whose body is larger than this and not read yet closes its connection: reading it just to
# keep the connection alive would cost more than the client's reconnect.
CLOSE_OVER_BYTES = 64 * 1024


class BusyRate:
    """The service rate: requests completed per second of busy time (at least one in flight), exponentially weighted
    over ``window_s`` of wall time, and held at the highest rate measured lately (decaying with ``hold_s``).

    The hold is what keeps admission from collapsing. With few requests in flight the rate measured is bounded by
    one request's latency, not by capacity (batches are small); when a flood of refused clients slows every turn of
    the event loop, that latency grows, a rule fed the current rate admits fewer, more clients are refused and
    spin, and the loop slows further (one worker, 256 wrk connections, 5 s runs: 7 model answers/s through the ASGI
    door and 292 through the parser door fed the current rate, 726-897 with the hold through the parser door,
    against about 1,600 at 64 connections). The rate the service has recently shown it sustains is the better
    estimate of what it can serve; a lasting slowdown still shows once the hold decays, and at once when an admitted
    request misses its deadline (``Gate.leave(missed=True)`` drops the hold). Idle time decays the count and the
    busy time alike, so the rate holds through a lull; it is ``None`` until ``MIN_BUSY_S`` of busy time has been
    seen."""

    def __init__(self, window_s: float = 1.0, clock: Clock = time.monotonic, hold_s: float = 10.0) -> None:
        self.window_s, self.clock, self.hold_s = window_s, clock, hold_s
        self.done = 0.0
        self.busy_s = 0.0
        self.busy = False
        self.at = clock()
        self.current: float | None = None  # the weighted rate now
        self.peak = 0.0  # the highest current rate, decayed by exp(-age / hold_s)
        self.peak_at = self.at

    def _advance(self) -> float:
        now = self.clock()
        dt = now - self.at
        if dt > 0:
            keep = math.exp(-dt / self.window_s)
            self.done *= keep
            # the weighted integral of "busy" over the last dt: window_s * (1 - keep) if busy throughout
            self.busy_s = self.busy_s * keep + (self.window_s * (1.0 - keep) if self.busy else 0.0)
            self.at = now
        return now

    def mark(self, busy: bool, completed: bool = False) -> None:
        """The in-flight count changed: ``busy`` is whether any request is in flight now; ``completed`` whether
        the change was a departure rather than an arrival."""
        now = self._advance()
        if completed:
            self.done += 1.0
        self.busy = busy
        if self.busy_s >= MIN_BUSY_S and self.done > 0:
            self.current = self.done / self.busy_s
            if self.current >= self._held(now):
                self.peak, self.peak_at = self.current, now

    def _held(self, now: float) -> float:
        return self.peak * math.exp(-(now - self.peak_at) / self.hold_s)

    @property
    def per_s(self) -> float | None:
        return None if self.current is None else max(self.current, self._held(self.clock()))


class EventRate:
    """Events per second, exponentially weighted over ``window_s``."""

    def __init__(self, window_s: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self.count = 0.0  # events, each weighted by exp(-age / window_s)
        self.at = clock()

    def _decayed(self, now: float) -> float:
        return self.count * math.exp(-(now - self.at) / self.window_s)

    def mark(self) -> None:
        now = self.clock()
        self.count, self.at = self._decayed(now) + 1.0, now

    @property
    def per_s(self) -> float:
        return self._decayed(self.clock()) / self.window_s


class LagProbe:
    """How late the event loop runs a timer due every ``interval_s``: the time a request that arrives now waits
    before its handler starts, which no in-flight count sees. ``lag_s`` is a moving average of the readings."""

    def __init__(self, interval_s: float = 0.005, clock: Clock = time.monotonic) -> None:
        self.interval_s, self.clock = interval_s, clock
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def observe(self, late_s: float) -> None:
        self.lag_s = LAG_KEEP * self.lag_s + (1 - LAG_KEEP) * max(0.0, late_s)

    async def _run(self) -> None:
        while True:
            due = self.clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(self.clock() - due)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lag-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Gate:
    """The in-flight count and the admission rule (see the module doc); ``on_shed`` is called once per refusal.

    ``verdict(budget_s)`` is the decision: None to admit, else the 429 to answer. ``enter`` / ``leave`` keep the
    count and feed the rate. Every departure counts, a deadline fallback too: Little's law relates the number in
    flight to the rate they leave at, whatever answer they leave with, so while admitted requests fall back the
    rate they leave at predicts the long waits that made them, and admission tightens."""

    def __init__(self, ceiling: int, retry_after_s: int, *, by_deadline: bool = True, deadline_share: float = 0.8,
                 window_s: float = 1.0, hold_s: float = 10.0, flood_ratio: float = 4.0, clock: Clock = time.monotonic,
                 on_shed: Callable[[str], None] = lambda reason: None) -> None:
        if ceiling < 1 or not 0 < deadline_share <= 1:
            raise ValueError(f"need ceiling >= 1 and 0 < deadline_share <= 1, got {ceiling}, {deadline_share}")
        self.ceiling, self.retry_after_s = ceiling, retry_after_s
        self.by_deadline, self.deadline_share = by_deadline, deadline_share
        self.on_shed = on_shed
        self.rate = BusyRate(window_s, clock, hold_s)
        self.refusals = EventRate(window_s, clock)
        self.flood_ratio = flood_ratio
        self.lag = LagProbe(clock=clock)
        self.in_flight = 0
        # Admitted at a door, handler not started yet: many requests arrive in one turn of the event loop, and
        # without this count every one of them would be judged by the in-flight count before any handler ran.
        self.arriving = 0

    @property
    def ahead(self) -> int:
        return self.in_flight + self.arriving

    def predicted_wait_s(self) -> float | None:
        """What a request admitted now would wait in all (loop lag + its turn at the measured rate); None before
        a rate is measured."""
        rate = self.rate.per_s
        return None if rate is None else self.lag.lag_s + (self.ahead + 1) / rate

    def capacity(self, budget_s: float) -> int:
        """How many requests in flight the rule admits for a deadline of ``budget_s`` now (the ceiling before a
        rate is measured, or with admission=fixed)."""
        rate = self.rate.per_s
        if not self.by_deadline or rate is None:
            return self.ceiling
        fits = math.floor((self.deadline_share * budget_s - self.lag.lag_s) * rate)
        return max(1, min(self.ceiling, fits))

    def verdict(self, budget_s: float) -> Overloaded | None:
        """None: admit a request whose deadline is ``budget_s`` from now. Otherwise the refusal (not yet counted;
        ``refuse`` counts it)."""
        if self.in_flight >= self.ceiling:
            return Overloaded(f"over capacity: {self.in_flight} requests in flight (ceiling {self.ceiling}); "
                              "retry later", "in_flight", self.ceiling,
                              headers={"Retry-After": str(self.retry_after_s)})
        if not self.by_deadline or self.ahead == 0:
            return None
        wait = self.predicted_wait_s()
        if wait is None or wait <= self.deadline_share * budget_s:
            return None
        budget_ms = round(budget_s * 1000, 1)
        return Overloaded(f"would miss its deadline: {self.ahead} requests ahead at {self.rate.per_s:.0f}/s and "
                          f"{self.lag.lag_s * 1000:.1f} ms of event-loop lag predict a {wait * 1000:.1f} ms wait, "
                          f"over {self.deadline_share:g} of timeout_ms {budget_ms:g}; retry later", "timeout_ms",
                          budget_ms, headers={"Retry-After": str(self.retry_after_s)})

    def refuse(self, exc: Overloaded) -> Overloaded:
        """Count ``exc`` as a refusal (reason ``in_flight`` at the ceiling, ``deadline`` otherwise) and return it."""
        self.refusals.mark()
        self.on_shed("in_flight" if exc.field == "in_flight" else "deadline")
        return exc

    def flooded(self) -> bool:
        """Refusals arrive faster than ``flood_ratio`` times the measured answer rate: clients are sending again as
        fast as they are refused, and the refusals themselves take the CPU the answers need.

        An open loop overloaded k times over sends about k - 1 refusals per answer whatever the service does, so
        below the ratio a pause (service/parser_door.py) would only delay its requests; a closed loop of clients
        that resend at once sends as many as the service can refuse, and pausing them is what frees the CPU. No
        hysteresis: holding the pause on down to half the ratio kept it on through an open loop at 4x, where it can
        only delay requests (the fault suite's pinned overload at 4x: about 17,000 pauses per 4 s window and a 429
        p99 of 50-58 ms, against 0 pauses and 26-33 ms at 2x in the same run)."""
        rate = self.rate.per_s
        return rate is not None and self.refusals.per_s > self.flood_ratio * rate

    def admitted_at_door(self, scope: Scope) -> None:
        """A door let this request in: it counts as ahead of later ones until its handler starts."""
        scope[ARRIVING] = True
        self.arriving += 1

    def handler_started(self, scope: Scope) -> None:
        """The handler runs (or the request ended without it): no longer arriving. Idempotent."""
        if scope.pop(ARRIVING, False):
            self.arriving -= 1

    def enter(self) -> None:
        self.in_flight += 1
        self.rate.mark(busy=True)

    def leave(self, missed: bool = False) -> None:
        """``missed``: the request's deadline passed before the model answered it. Then the rate held from earlier
        is wrong about now, and is dropped: the rule goes by the rate measured now."""
        self.in_flight -= 1
        if missed:
            self.rate.peak = 0.0
        self.rate.mark(busy=self.in_flight > 0, completed=True)


def header_budget_s(headers: Iterable[tuple[bytes, bytes]], default_s: float) -> float:
    """The deadline the door judges by: ``X-Timeout-Ms`` when present and a positive number, else ``default_s``."""
    for name, value in headers:
        if name.lower() == TIMEOUT_HEADER:
            with contextlib.suppress(ValueError):
                ms = float(value)
                if 0 < ms < math.inf:
                    return ms / 1000.0
    return default_s


def refusal_bytes(exc: Overloaded) -> bytes:
    return orjson.dumps(error_body(exc))


class Door:
    """Pure ASGI middleware: a POST to ``path`` that the gate would refuse gets 429 before routing or reading the
    body; anything else passes through untouched. ``observe`` gets the seconds each refusal took here; ``refused``,
    when set, each refusal itself."""

    def __init__(self, app: ASGIApp, gate: Gate, default_budget_s: float, path: str = "/rerank",
                 observe: Callable[[float], None] = lambda s: None, refused: RefusalHook | None = None) -> None:
        self.app, self.gate, self.path = app, gate, path
        self.default_budget_s, self.observe, self.refused = default_budget_s, observe, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        exc = None if ARRIVING in scope else self.gate.verdict(header_budget_s(scope["headers"],
                                                                                self.default_budget_s))
        if exc is None:  # admitted here, or already by the parser door (service/parser_door.py)
            if ARRIVING not in scope:
                self.gate.admitted_at_door(scope)
            try:
                await self.app(scope, receive, send)
            finally:
                self.gate.handler_started(scope)
            return
        self.gate.refuse(exc)
        body = refusal_bytes(exc)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", str(self.gate.retry_after_s).encode())]
        if declared_length(scope["headers"]) > CLOSE_OVER_BYTES:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        took_s = time.perf_counter() - started
        self.observe(took_s + self.gate.lag.lag_s)
        if self.refused is not None:
            self.refused(scope["headers"], took_s, exc)


def declared_length(headers: Headers) -> int:
    """The body length the headers declare (lower-case names); chunked counts as large, none as 0."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
        if name == b"transfer-encoding":  # chunked: size unknown, treat as large
            return CLOSE_OVER_BYTES + 1
    return 0

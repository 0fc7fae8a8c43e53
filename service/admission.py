"""Admission: how many /rerank requests may be inside the model stage at once, and a 429 for the rest.

Owns: the in-flight count, the limit (fixed, or adapted from measured latency), and the door: a pure ASGI
middleware that answers 429 before the app routes or reads the body. Does not know: models, features, the
batcher or the HTTP server underneath (any ASGI server works; no uvicorn internals).

A slot is held from a complete, parsed body to the answer. A client that trickles its body holds no slot
(the app bounds how long it may take, ``RERANK_BODY_TIMEOUT_MS``), so slow senders cannot starve the gate.
The door refuses while every slot is taken; the handler takes the slot after reading the body and refuses
there too if the door's check went stale meanwhile.

The adaptive limit is AIMD on the model stage's latency (queue wait plus inference), as in Netflix's
concurrency-limits: a request that spent more than ``SLOW_FRACTION`` of its remaining deadline there, or
missed it, is a congestion signal and cuts the limit by ``BACKOFF`` (once per round: signals from requests
admitted before the last cut are ignored); a fast request while at least half the limit is in use raises it,
by one per request until the first cut (slow start) and by one per limit's worth of requests after. The
limit stays between the floor and the ceiling. Tuned to the deadline the requests carry, not to a host: the
same settings hold on a 2-core VM and on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import orjson

from service.errors import Overloaded, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SLOW_FRACTION = 0.5  # of the request's remaining deadline, spent waiting for and running the model
BACKOFF = 0.9  # multiplicative decrease on a congestion signal
# A refused request whose body is larger than this and not read yet closes its connection: reading it just to
# keep the connection alive would cost more than the client's reconnect.
CLOSE_OVER_BYTES = 64 * 1024


class Limit(Protocol):
    """How many requests may be in flight; told how each admitted request fared."""

    @property
    def value(self) -> int: ...

    def sample(self, latency_s: float, budget_s: float, in_flight: int, round_: int) -> None: ...

    @property
    def round(self) -> int: ...


class FixedLimit:
    """A hand-set limit; samples change nothing."""

    def __init__(self, value: int) -> None:
        self._value = value

    @property
    def value(self) -> int:
        return self._value

    @property
    def round(self) -> int:
        return 0

    def sample(self, latency_s: float, budget_s: float, in_flight: int, round_: int) -> None:
        return None


class AimdLimit:
    """Additive increase, multiplicative decrease between ``floor`` and ``ceiling`` (see the module doc)."""

    def __init__(self, floor: int, ceiling: int, initial: int | None = None) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got floor {floor}, ceiling {ceiling}")
        self.floor, self.ceiling = floor, ceiling
        self.limit = float(min(ceiling, max(floor, initial if initial is not None else floor)))
        self.slow_start = True
        self._round = 0  # bumped by every cut; a request remembers the round it was admitted in
        self.cuts = 0

    @property
    def value(self) -> int:
        return int(self.limit)

    @property
    def round(self) -> int:
        return self._round

    def sample(self, latency_s: float, budget_s: float, in_flight: int, round_: int) -> None:
        """``latency_s``: the request's time in the model stage; ``budget_s``: its deadline as it entered;
        ``in_flight``: requests in flight as it left (itself included); ``round_``: the round it entered in."""
        if latency_s > SLOW_FRACTION * budget_s:
            if round_ == self._round:
                self.limit = max(float(self.floor), self.limit * BACKOFF)
                self.slow_start = False
                self._round += 1
                self.cuts += 1
            return
        if 2 * in_flight >= self.limit:
            self.limit = min(float(self.ceiling), self.limit + (1.0 if self.slow_start else 1.0 / self.limit))


class Gate:
    """The in-flight count against a ``Limit``; ``on_shed`` is called once per request refused for it."""

    def __init__(self, limit: Limit, retry_after_s: int, on_shed: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.on_shed = on_shed
        self.in_flight = 0

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit.value

    def try_enter(self) -> int | None:
        """Take a slot: the round it was taken in (hand it to ``leave``), or None when the gate is full."""
        if self.full:
            return None
        self.in_flight += 1
        return self.limit.round

    def leave(self, round_: int, latency_s: float | None = None, budget_s: float = math.inf) -> None:
        """Give the slot back; ``latency_s`` (None: the request never reached the model) feeds the limit."""
        if latency_s is not None:
            self.limit.sample(latency_s, budget_s, self.in_flight, round_)
        self.in_flight -= 1

    def refusal(self) -> Overloaded:
        limit = self.limit.value
        return Overloaded(f"over capacity: {self.in_flight} requests in flight (limit {limit}); retry later",
                          "in_flight", limit, headers={"Retry-After": str(self.retry_after_s)})


class Door:
    """Pure ASGI middleware: a POST to ``path`` while the gate is full gets 429 before routing or reading the
    body; anything else passes through untouched."""

    def __init__(self, app: ASGIApp, gate: Gate, path: str = "/rerank") -> None:
        self.app, self.gate, self.path = app, gate, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.gate.full or scope["method"] != "POST"
                or scope["path"] != self.path):
            await self.app(scope, receive, send)
            return
        self.gate.on_shed()
        exc = self.gate.refusal()
        body = orjson.dumps(error_body(exc))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
        if _declared_length(scope) > CLOSE_OVER_BYTES:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
        if name == b"transfer-encoding":  # chunked: size unknown, treat as large
            return CLOSE_OVER_BYTES + 1
    return 0

"""Admission: how many /rerank requests may be inside the service at once, and a 429 at the door for the rest.

Owns: the in-flight count, the limit, the canned 429 and an HTTP protocol that answers it straight from the
parser. Does not know: models, features or the batcher.

Why at the door: on a CPU host the event loop and the batch encoder share one GIL, and a request answered 429
by the ASGI app still costs uvicorn's task, Starlette's routing and a JSON body: about a third of a served
request (measured). Under twice the saturating rate that third eats half the capacity. ``SheddingProtocol``
answers from uvicorn's parser callbacks instead, without a task or the app, for a few tens of microseconds.
The handler checks the same ``Gate``, so the limit holds under a plain ``uvicorn service.app:app`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PENDING_KEY = "rerank.pending"  # scope key SheddingProtocol sets on the requests it counted as pending


class Gate:
    """At most ``max_in_flight`` /rerank requests between the door and their answer; the rest get 429."""

    def __init__(self, max_in_flight: int, retry_after_s: int, path: bytes = b"/rerank",
                 on_shed: Callable[[], None] = lambda: None) -> None:
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.path = path
        self.on_shed = on_shed  # called once per request refused for the limit, at the door or in the app
        self.in_flight = 0  # in the handler: from its first line to its answer
        # Let in by SheddingProtocol, handler not started yet: one loop turn parses every readable socket
        # before any handler runs, so without this a burst would all pass the door on the same count.
        self.pending = 0
        self.response = self._canned()

    @property
    def full(self) -> bool:
        """No room for one more: the door's test."""
        return self.in_flight + self.pending >= self.max_in_flight

    @property
    def over(self) -> bool:
        """The handler's test, made after ``enter`` counted the request itself."""
        return self.in_flight > self.max_in_flight

    def enter(self, scope: Mapping[str, Any]) -> None:
        """The handler's first line: the request moves from pending (if the door counted it) to in flight.
        Counting starts before the body is read, so a client that trickles its body holds a slot meanwhile."""
        if scope.get(PENDING_KEY):
            self.pending -= 1
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def message(self) -> str:
        return f"over capacity: {self.in_flight} requests in flight (max_in_flight {self.max_in_flight}); retry later"

    def _canned(self) -> bytes:
        body = orjson.dumps({"error": {"code": "overloaded", "message": f"over capacity at the door: "
                                       f"max_in_flight {self.max_in_flight} requests are in flight; retry later",
                                       "field": "max_in_flight", "value": self.max_in_flight}})
        return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                b"retry-after: " + str(self.retry_after_s).encode() + b"\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)


def shedding_protocol(gate: Gate) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, answering 429 from the parser while ``gate`` is full. Only a plain
    POST to the gated path is shed, and only when no earlier request on the connection is still being
    answered (responses must stay in order); everything else takes uvicorn's normal path."""

    class SheddingProtocol(HttpToolsProtocol):
        shedding = False

        def on_headers_complete(self) -> None:
            # Only a request uvicorn starts at once is the door's business: a pipelined one waits behind an
            # answer still owed on this connection, and never starts if the connection closes first.
            idle = (self.cycle is None or self.cycle.response_complete) and not self.pipeline
            gated = idle and self.parser.get_method() == b"POST" and self.url.split(b"?", 1)[0] == gate.path
            self.shedding = gated and gate.full and not self.expect_100_continue
            if self.shedding:
                return
            super().on_headers_complete()
            if gated and self.cycle is not None and self.cycle.scope is self.scope:  # started (not an upgrade)
                cast(dict[str, Any], self.scope)[PENDING_KEY] = True
                gate.pending += 1

        def on_body(self, body: bytes) -> None:
            if not self.shedding:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self.shedding:
                super().on_message_complete()
                return
            self.shedding = False
            gate.on_shed()
            self.transport.write(gate.response)
            if not self.parser.should_keep_alive():
                self.transport.close()
            else:  # as after any answer: an idle keep-alive connection closes after timeout_keep_alive
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    return SheddingProtocol


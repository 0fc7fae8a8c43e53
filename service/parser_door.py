"""The default admission door on the uvicorn releases it was written for: the 429 answered from uvicorn's HTTP parser.

Owns: a subclass of uvicorn's httptools protocol that refuses a POST to the gated path when the gate would
(``admission.Gate.verdict``, judged by the ``X-Timeout-Ms`` header or the default deadline, as the ASGI door does),
from the parser's callbacks, without a task, the ASGI app or reading the rest of the body. Does not know: the
admission rule, models, or anything else.

Why it exists: on a CPU host the event loop and the batch encoder share one GIL, and a refusal through ASGI
costs uvicorn's task, the middleware call and two ``send`` messages. Measured on this 2-core machine with wrk
against a gate held full: about 8,000 refusals/s through the ASGI door, 27,000-40,000/s from here; under
``make faults``' overload (twice the saturating rate) that difference is about a tenth of the goodput.

Under the deadline rule the evidence is mixed, and it is the default because every figure of this service in
reports/ was measured with it. A closed-loop client refused 429 sends again at once, so at 256 wrk connections
against one worker the refusals take the event loop: one 5 s run each gave 714 model answers/s through this door
and 257 through the ASGI one. But with the worker pinned to one core and every request refused (fixed admission,
ceiling 1, wrk at 64 connections on the other core, two runs each) both doors cost the same, 74-75 µs of CPU per
429 here against 71-72 µs; on this VM the kernel's share of a request (epoll, recv, send) seems to set the price.
An A/B of the two doors inside `make bench` is the measurement still owed.

What only this door can do: stop reading a connection. With ``RERANK_REFUSAL_PAUSE_MS`` set (off by default),
when refused clients send again as fast as they are refused (``Gate.flooded``), each refused connection is left
unread that long, so the kernel holds its next request instead of the event loop refusing it at once. In 4 s runs
of one worker under 256 wrk connections, 3 each with a 20 ms pause and without, it gave 1,013-1,385 model
answers/s against 263-695; why it is not on by default is in the README (Floods of refused clients).

Why it is guarded: it reads uvicorn's private attributes (``cycle``, ``pipeline``, ``parser``,
``expect_100_continue``, ``_unset_keepalive_if_required``, the keep-alive timer), which change between uvicorn
releases. It refuses to load on a uvicorn it was not written for (``SUPPORTED``): ``RERANK_ADMISSION_DOOR=auto``
(the default) then serves with the ASGI door in ``admission.py``, which works on any version, and logs why.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.admission import (
    CLOSE_OVER_BYTES,
    UNREAD_S,
    Gate,
    RefusalHook,
    Scope,
    declared_length,
    header_budget_s,
    refusal_bytes,
)
from service.errors import Overloaded

SUPPORTED = ("0.54.", "0.55.")  # uvicorn releases whose httptools protocol this subclass was written against and tested
# 0.55: its httptools protocol differs from 0.54 only in header-value whitespace, the upgrade path and a Python<3.11
# branch; none of the attributes used here changed, and tests/service/test_admission.py passes on it.


class UnsupportedUvicorn(RuntimeError):
    """uvicorn is a version this module was not written for."""


def check_version(version: str = uvicorn.__version__) -> None:
    if not version.startswith(SUPPORTED):
        written_for = ", ".join(v + "x" for v in SUPPORTED)
        raise UnsupportedUvicorn(f"RERANK_ADMISSION_DOOR=parser is written for uvicorn {written_for}, "
                                 f"this is {version}: use RERANK_ADMISSION_DOOR=asgi, or auto, which falls back to it")


def unread_bytes(transport: asyncio.Transport) -> int:
    """Bytes the kernel holds for this connection that the server has not read (FIONREAD); 0 if it cannot tell."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except (AttributeError, OSError, ValueError):
        return 0


def refusal(exc: Overloaded, retry_after_s: int, close: bool = False) -> bytes:
    body = refusal_bytes(exc)
    return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: "
            + str(retry_after_s).encode() + (b"\r\nconnection: close" if close else b"") + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


@dataclass(frozen=True)
class DoorSettings:
    """What one service's parser door refuses by and reports to (see ``parser_door``)."""

    gate: Gate
    default_budget_s: float
    observe: Callable[[float], None]
    path: bytes
    pause_s: float
    paused: Callable[[], None]
    refused: RefusalHook | None = None


class ParserDoor(HttpToolsProtocol):
    """uvicorn's httptools protocol with the admission door in its parser callbacks; ``parser_door`` makes the
    subclass that carries a service's ``DoorSettings``."""

    door: ClassVar[DoorSettings]
    refusing: Overloaded | None = None
    answered = False  # the refusal went out at the headers and the connection is closing
    headers_at = 0.0
    unread_s = 0.0  # the pause this connection's next request may have waited through, charged to its deadline

    def resume(self) -> None:
        if self.transport.is_closing():
            return
        if not unread_bytes(self.transport):  # nothing came during the pause: the next request waits for nothing
            self.unread_s = 0.0
        self.flow.resume_reading()

    def on_headers_complete(self) -> None:
        door, gate = self.door, self.door.gate
        self.refusing, self.headers_at = None, 0.0
        unread_s, self.unread_s = self.unread_s, 0.0
        idle = (self.cycle is None or self.cycle.response_complete) and not self.pipeline
        if (idle and self.parser.get_method() == b"POST" and self.url.split(b"?", 1)[0] == door.path
                and not self.expect_100_continue):
            self.headers_at = time.perf_counter()
            self.refusing = gate.verdict(header_budget_s(self.headers, door.default_budget_s) - unread_s)
            if self.refusing is not None and declared_length(self.headers) > CLOSE_OVER_BYTES:
                # reading a large body only to keep the connection would cost more than the client's reconnect;
                # ``refusing`` stays set, so the rest of the message already read is ignored
                self.answered = True
                gate.refuse(self.refusing)
                self.transport.write(refusal(self.refusing, gate.retry_after_s, close=True))
                self.transport.close()
                self.refused_now(self.refusing)
                return
        if self.refusing is None:
            super().on_headers_complete()
            if unread_s:
                self.scope[UNREAD_S] = unread_s  # type: ignore[literal-required]
            if self.headers_at:  # judged and admitted here: the ASGI door will not judge it again
                gate.admitted_at_door(cast(Scope, self.scope))

    def on_body(self, body: bytes) -> None:
        if self.refusing is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        exc, self.refusing = self.refusing, None
        if exc is None:
            super().on_message_complete()
            return
        if self.answered:  # refused and closed at the headers
            self.answered = False
            return
        door, gate = self.door, self.door.gate
        gate.refuse(exc)
        self.transport.write(refusal(exc, gate.retry_after_s))
        if not self.parser.should_keep_alive():
            self.transport.close()
        else:  # as after any answer: an idle keep-alive connection closes after timeout_keep_alive
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
            if door.pause_s > 0 and gate.flooded():
                door.paused()
                self.flow.pause_reading()
                self.unread_s = door.pause_s
                self.loop.call_later(door.pause_s, self.resume)
        self.refused_now(exc)

    def refused_now(self, exc: Overloaded) -> None:
        """The refusal just answered, to the door's observers: its seconds from the headers (plus the loop's lag
        before them) to the histogram, and itself to the ``refused`` hook when there is one."""
        took_s = time.perf_counter() - self.headers_at
        self.door.observe(took_s + self.door.gate.lag.lag_s)
        if self.door.refused is not None:
            self.door.refused(self.headers, took_s, exc)


def parser_door(gate: Gate, default_budget_s: float, observe: Callable[[float], None] = lambda s: None,
                path: bytes = b"/rerank", pause_s: float = 0.0, paused: Callable[[], None] = lambda: None,
                refused: RefusalHook | None = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, answering 429 from the parser for a request ``gate`` would refuse. Only a plain
    POST to ``path`` is refused, and only when no earlier request on the connection is still being answered
    (responses must stay in order); everything else takes uvicorn's normal path, where the ASGI door and the
    handler apply the same gate. A slot is taken by the handler once the body is in. ``observe`` gets the seconds
    each refusal took from its headers to its answer, plus the event-loop lag before them.

    ``pause_s`` > 0: while the gate is flooded (``Gate.flooded``: refusals outrun the answers many times over), a
    connection that was just refused is not read for that long (TCP backpressure), so clients that send again at
    once cannot spin the event loop on refusals; the next request on it, if it came during the pause, is judged at
    this door and in the handler (scope ``UNREAD_S``) as if it had waited the whole pause already. ``paused`` is
    called once per pause. ``refused``, when set, gets each refusal with the request's headers (the access log and
    tracing of door refusals)."""
    check_version()
    settings = DoorSettings(gate, default_budget_s, observe, path, pause_s, paused, refused)
    return type("ParserDoor", (ParserDoor,), {"door": settings})

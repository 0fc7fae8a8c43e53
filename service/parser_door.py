"""Opt-in accelerator (``RERANK_ADMISSION_DOOR=parser``): the admission 429 answered from uvicorn's HTTP parser.

Owns: a subclass of uvicorn's httptools protocol that refuses a POST to the gated path while the gate is full,
from the parser's callbacks, without a task, the ASGI app or reading the rest of the body. Does not know: the
limit (``admission.Gate``), models, or anything else.

Why it exists: on a CPU host the event loop and the batch encoder share one GIL, and a refusal through ASGI
costs uvicorn's task, the middleware call and two ``send`` messages. Measured on this 2-core machine with wrk
against a gate held full: about 8,000 refusals/s through the ASGI door, 27,000-40,000/s from here; under
``make faults``' overload (twice the saturating rate) that difference is about a tenth of the goodput.

Why it is not the default: it reads uvicorn's private attributes (``cycle``, ``pipeline``, ``parser``,
``expect_100_continue``, ``_unset_keepalive_if_required``, the keep-alive timer), which change between uvicorn
releases. It refuses to load on a uvicorn it was not written for (``SUPPORTED``); the ASGI door in
``admission.py`` works on any version.
"""

from __future__ import annotations

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.admission import Gate
from service.errors import error_body

SUPPORTED = ("0.54.", "0.55.")  # uvicorn releases whose httptools protocol this subclass was written against and tested
# 0.55: its httptools protocol differs from 0.54 only in header-value whitespace, the upgrade path and a Python<3.11
# branch; none of the attributes used here changed, and tests/test_admission.py passes on it.


class UnsupportedUvicorn(RuntimeError):
    """uvicorn is a version this module was not written for."""


def check_version(version: str = uvicorn.__version__) -> None:
    if not version.startswith(SUPPORTED):
        written_for = ", ".join(v + "x" for v in SUPPORTED)
        raise UnsupportedUvicorn(f"RERANK_ADMISSION_DOOR=parser is written for uvicorn {written_for}, "
                                 f"this is {version}: use RERANK_ADMISSION_DOOR=asgi (the default)")


def refusal(gate: Gate) -> bytes:
    exc = gate.refusal()
    body = orjson.dumps(error_body(exc))
    headers = b"".join(f"{k.lower()}: {v}\r\n".encode() for k, v in exc.headers.items())
    return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n" + headers
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def parser_door(gate: Gate, path: bytes = b"/rerank") -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, answering 429 from the parser while ``gate`` is full. Only a plain POST to
    ``path`` is refused, and only when no earlier request on the connection is still being answered (responses
    must stay in order); everything else takes uvicorn's normal path, where the ASGI door and the handler apply
    the same gate. Nothing is counted here: a slot is taken by the handler once the body is in."""
    check_version()

    class ParserDoor(HttpToolsProtocol):
        refusing = False

        def on_headers_complete(self) -> None:
            idle = (self.cycle is None or self.cycle.response_complete) and not self.pipeline
            self.refusing = (idle and gate.full and self.parser.get_method() == b"POST"
                             and self.url.split(b"?", 1)[0] == path and not self.expect_100_continue)
            if not self.refusing:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.refusing:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self.refusing:
                super().on_message_complete()
                return
            self.refusing = False
            gate.on_shed()
            self.transport.write(refusal(gate))
            if not self.parser.should_keep_alive():
                self.transport.close()
            else:  # as after any answer: an idle keep-alive connection closes after timeout_keep_alive
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    return ParserDoor

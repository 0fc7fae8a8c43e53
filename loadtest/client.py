"""The one HTTP load client: keep-alive HTTP/1.1 on asyncio, closed or open loop, in its own process.

    python -m loadtest.client --url http://127.0.0.1:8000 --connections 64 --rate 2000 --duration 5 --out r.json

Owns: sending held-out bodies to ``POST /rerank`` over ``connections`` keep-alive connections, either closed loop
(each connection sends its next request when the last answer is read) or open loop (request i is due at
``i / rate`` seconds, whatever the answers do), and one ``Record`` per request (send time, latency, status,
fallback, Retry-After); ``Load``, which runs it as a second process (uvloop, no cyclic GC) so it takes as little
as it can from the cores it measures; and the small admin calls (``get``, ``post``, ``send``). Does not know: what
the records mean for a scenario or a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import uvloop

from loadtest import heldout
from loadtest.procs import pinned

ADMIN_TOKEN = "faults-admin-token"  # the admin token the load tools' services are started with


@dataclass
class Record:
    sent: float  # time.monotonic() when the request was written (system-wide clock, comparable across processes)
    latency_s: float  # from the write to the answer's last byte
    status: int  # 0: connection error or client timeout
    fallback: bool
    retry_after: bool


def request_bytes(body: bytes) -> bytes:
    return (b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


async def exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], body: bytes, sent: float
                   ) -> tuple[Record, bool]:
    """One request on an open connection: its record, and whether the server closes the connection after it."""
    reader, writer = conn
    writer.write(request_bytes(body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    payload = await asyncio.wait_for(reader.readexactly(length), 10)
    lower = head.lower()
    record = Record(sent, time.monotonic() - sent, int(head[9:12]), b'"fallback":true' in payload,
                    b"retry-after:" in lower)
    return record, b"connection: close" in lower


async def drive(url: str, bodies: list[bytes], connections: int, rate: float = 0.0, duration_s: float = 1e9,
                requests: int = 1 << 62, stop: asyncio.Event | None = None) -> list[Record]:
    """``connections`` keep-alive connections until ``duration_s``, ``requests`` sent in all or ``stop``: closed
    loop when ``rate`` is 0, else open loop at ``rate`` requests per second. A connection error or timeout is a
    record with status 0, and the connection is opened again. A request's latency starts at its write, never at
    the connection's set-up."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    stop = stop or asyncio.Event()
    records: list[Record] = []
    t0 = time.monotonic()
    until, counter = t0 + duration_s, iter(range(requests))

    async def connection() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in counter:
            due = t0 + i / rate if rate > 0 else time.monotonic()
            if stop.is_set() or due >= until:
                break
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                    sent = time.monotonic()
                record, closing = await exchange(conn, bodies[i % len(bodies)], sent)
                records.append(record)
                if closing:
                    conn[1].close()
                    conn = None
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                records.append(Record(sent, time.monotonic() - sent, 0, False, False))
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return records


class Load:
    """The load process (``python -m loadtest.client``), started now; ``stop()`` ends it and returns its records."""

    def __init__(self, url: str, models: Path, connections: int = 4, rate: float = 0.0, duration_s: float = 600.0,
                 cpus: set[int] | None = None) -> None:
        self.out = Path(tempfile.mkstemp(suffix=".json")[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.client", "--url", url, "--models", str(models),
                                      "--connections", str(connections), "--rate", str(rate), "--duration",
                                      str(duration_s), "--out", str(self.out)], preexec_fn=pinned(cpus))
        self.started = time.monotonic()

    def stop(self, timeout_s: float = 30, wait_s: float = 0.0) -> list[Record]:
        """Records so far; ``wait_s`` > 0 first lets it run to its own duration (at most that long)."""
        if wait_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout_s)
        rows = json.loads(self.out.read_text() or "[]")
        self.out.unlink()
        return [Record(float(a), float(b), int(c), bool(d), bool(e)) for a, b, c, d, e in rows]


def get(url: str, timeout: float = 2) -> tuple[int, Any]:
    """Status and JSON (or text) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode() or "{}")


def post(url: str, token: str = ADMIN_TOKEN, timeout: float = 120) -> tuple[int, Any]:
    """Status and JSON of an admin POST with a bearer token."""
    req = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode() or "{}")


def send(url: str, headers: dict[str, str], body: bytes) -> int:
    """The status of one ``POST /rerank`` with these headers and bytes; 0 when the server closed the connection
    (e.g. an over-limit body): a client error, not a 5xx."""
    req = urllib.request.Request(f"{url}/rerank", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the service's base URL")
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder holding heldout.jsonl")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s, open loop; 0 = closed loop")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds; SIGINT or SIGTERM ends it sooner")
    parser.add_argument("--out", type=Path, required=True, help="the records, as a JSON list of rows")
    args = parser.parse_args(argv)
    bodies = heldout.bodies(args.models)

    async def run() -> list[Record]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await drive(args.url, bodies, args.connections, args.rate, args.duration, stop=stop)

    # No cyclic GC: the records are acyclic, and a gen-2 pass over 100k of them stalls the loop for tens of
    # milliseconds, which would show up as the service's latency.
    gc.disable()
    # uvloop: the generator shares this machine's cores with the service, so it should take as little as it can.
    records = uvloop.run(run())
    args.out.write_text(json.dumps([[r.sent, r.latency_s, r.status, r.fallback, r.retry_after] for r in records]))


if __name__ == "__main__":
    main()

"""Replay held-out requests against a running service and read latency from its own histograms.

    python -m loadtest.replay --url http://127.0.0.1:8000 --concurrency 1 --requests 2000
    python -m loadtest.replay --concurrency 1,4,16,64 --requests 3000 --json build/replay.json

Requests are the model's ``heldout.jsonl`` (real users, real 50-candidate lists with retriever scores).
The client is a few lines of asyncio on keep-alive HTTP/1.1 connections so that, on a small machine, it
takes as little CPU from the server as it can. Latency percentiles come from the service's
``rerank_request_duration_seconds`` histogram (the delta over the run, interpolated within buckets);
throughput is answered requests per second of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loadtest.workload import newest_heldout

METRIC = "rerank_request_duration_seconds"


def histograms(url: str, names: Iterable[str]) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts (upper bound -> count) of Prometheus histograms, from one scrape."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {name: {float(m.group(1)): float(m.group(2))
                   for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', text, re.M)}
            for name in names}


def histogram(url: str, name: str = METRIC) -> dict[float, float]:
    return histograms(url, [name])[name]


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """q-quantile of the observations between two scrapes, linear within the bucket (seconds)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, prev = 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - prev) / max(cum - prev, 1e-12)
        lower, prev = bound, cum
    return bounds[-2]


def load_bodies(model_dir: Path) -> list[bytes]:
    """Request bodies from the newest model's heldout.jsonl under ``model_dir`` (or that folder)."""
    try:
        heldout = newest_heldout(model_dir)
    except FileNotFoundError as exc:
        sys.exit(str(exc))
    return [json.dumps(json.loads(line)["request"]).encode() for line in heldout.read_text().splitlines()]


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=dict)
    fallbacks: int = 0
    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)  # client side: write to last byte read


async def worker(host: str, port: int, bodies: list[bytes], tally: Tally, until: float, limit: int) -> None:
    """One keep-alive connection sending the next body as soon as the last answer is read, until the
    monotonic time ``until`` or ``limit`` requests in all (shared with the other workers)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while tally.sent < limit and time.monotonic() < until:
            body = bodies[tally.sent % len(bodies)]
            tally.sent += 1
            t0 = time.perf_counter()
            writer.write(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            payload = await reader.readexactly(length)
            tally.latencies_s.append(time.perf_counter() - t0)
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if b'"fallback":true' in payload:
                tally.fallbacks += 1
    finally:
        writer.close()


async def drive(url: str, bodies: list[bytes], concurrency: int, duration_s: float = 1e9,
                requests: int = 1 << 62) -> tuple[Tally, float, float]:
    """Closed loop: ``concurrency`` connections for ``duration_s`` or ``requests``, whichever ends first.
    Returns the tally, the wall time and this process's CPU seconds over it (the client's own cost)."""
    parsed = urlparse(url)
    tally = Tally()
    t0, cpu0 = time.perf_counter(), time.process_time()
    until = time.monotonic() + duration_s
    await asyncio.gather(*(worker(parsed.hostname or "127.0.0.1", parsed.port or 80, bodies, tally, until, requests)
                           for _ in range(concurrency)))
    return tally, time.perf_counter() - t0, time.process_time() - cpu0


async def run_level(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict[str, Any]:
    before = histogram(url)
    tally, wall, _ = await drive(url, bodies, concurrency, requests=n)
    after = histogram(url)
    answered = sum(tally.statuses.values())
    return {"concurrency": concurrency, "requests": answered, "wall_s": round(wall, 3),
            "throughput_rps": round(answered / wall, 1), "statuses": tally.statuses, "fallbacks": tally.fallbacks,
            **{f"p{int(q * 1000) / 10:g}_ms": round(quantile(before, after, q) * 1000, 3)
               for q in (0.5, 0.9, 0.99, 0.999)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder holding heldout.jsonl")
    parser.add_argument("--concurrency", default="1", help="comma-separated connection counts, one run each")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=200, help="requests sent before measuring")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    bodies = load_bodies(args.models)
    asyncio.run(run_level(args.url, bodies, 4, args.warmup))
    results = []
    for c in (int(x) for x in args.concurrency.split(",")):
        result = asyncio.run(run_level(args.url, bodies, c, args.requests))
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

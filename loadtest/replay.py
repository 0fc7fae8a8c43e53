"""Replay held-out requests against a running service and read latency from its own histograms.

    python -m loadtest.replay --url http://127.0.0.1:8000 --concurrency 1 --requests 2000
    python -m loadtest.replay --concurrency 1,4,16,64 --requests 3000 --json build/replay.json

Requests are the model's ``heldout.jsonl`` (real users, real 50-candidate lists with retriever scores).
The client is the load client (``loadtest/client.py``) in this process, closed loop on keep-alive HTTP/1.1
connections, so that on a small machine it takes as little CPU from the server as it can. Latency percentiles
come from the service's ``rerank_request_duration_seconds`` histogram (the delta over the run, interpolated
within buckets); throughput is answered requests per second of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadtest import heldout
from loadtest.client import drive
from loadtest.scrape import quantiles_ms, scrape

METRIC = "rerank_request_duration_seconds"


async def run_level(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict[str, Any]:
    """``n`` requests over ``concurrency`` connections, closed loop: answered requests per second of wall time and
    the handler's percentiles over the level."""
    before = scrape(url)
    t0 = time.perf_counter()
    records = await drive(url, bodies, concurrency, requests=n)
    wall = time.perf_counter() - t0
    after = scrape(url)
    statuses: dict[int, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    answered = sum(n for status, n in statuses.items() if status)
    return {"concurrency": concurrency, "requests": answered, "wall_s": round(wall, 3),
            "throughput_rps": round(answered / wall, 1), "statuses": statuses,
            "fallbacks": sum(r.fallback for r in records),
            **quantiles_ms(before, after, METRIC, (0.5, 0.9, 0.99, 0.999))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder holding heldout.jsonl")
    parser.add_argument("--concurrency", default="1", help="comma-separated connection counts, one run each")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=200, help="requests sent before measuring")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    try:
        bodies = heldout.bodies(args.models)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(str(exc))
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

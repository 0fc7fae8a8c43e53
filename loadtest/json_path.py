"""Cost of the JSON path per request (parse + validate + encode + serialize) next to inference.

    python loadtest/json_path.py [--models models]

Times each stage over the held-out requests of the newest exported model, in-process, no HTTP.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from loadtest import heldout
from service.model import Job, RerankModel, UserFeatures, find_version
from service.schemas import check_request, parse_request


def per_call_us(fn: Callable[[int], object], n: int) -> float:
    for i in range(min(n, 200)):
        fn(i)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (newest version used)")
    parser.add_argument("--n", type=int, default=3000, help="calls per stage")
    args = parser.parse_args()
    folder = find_version(args.models)
    model = RerankModel(folder, "cpu")
    bodies = heldout.bodies(folder)
    reqs = [parse_request(b) for b in bodies]
    jobs = [Job([c.item_id for c in r.candidates], np.array([c.score for c in r.candidates], np.float32),
                UserFeatures({}, ()), 6) for r in reqs]
    ranked = model.rank(jobs[:1])[0]
    response = {"request_id": "r", "model_version": model.version, "fallback": False, "fallback_reason": None,
                "items": [{"item_id": jobs[0].item_ids[int(p)], "score": float(s), "rank": i + 1}
                          for i, (p, s) in enumerate(zip(ranked.positions, ranked.logits, strict=True))]}
    m = len(bodies)
    stages = {
        "parse + type-check (pydantic, 50 candidates)": per_call_us(lambda i: parse_request(bodies[i % m]), args.n),
        "model checks (range, duplicates, k)": per_call_us(
            lambda i: check_request(reqs[i % m], 50, (0.0, 1.0), 6, 1e4), args.n),
        "build job (ids, scores array)": per_call_us(lambda i: Job(
            [c.item_id for c in reqs[i % m].candidates],
            np.fromiter((c.score for c in reqs[i % m].candidates), np.float32, len(reqs[i % m].candidates)),
            UserFeatures({}, ()), 6), args.n),
        "serialize response (orjson)": per_call_us(lambda i: orjson.dumps(response), args.n),
        "inference, batch 1 (encode + ONNX Runtime + top-k)": per_call_us(lambda i: model.rank([jobs[i % m]]),
                                                                           args.n // 3),
    }
    width = max(len(k) for k in stages)
    for name, us in stages.items():
        print(f"{name:<{width}}  {us:8.1f} us")
    json_us = sum(v for k, v in stages.items() if not k.startswith("inference"))
    print(f"{'JSON path total':<{width}}  {json_us:8.1f} us "
          f"({json_us / stages['inference, batch 1 (encode + ONNX Runtime + top-k)'] * 100:.0f}% of batch-1 inference)")


if __name__ == "__main__":
    main()

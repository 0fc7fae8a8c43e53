"""`make bench`: the service with 1 and N workers beside the HTTP ceiling with as many processes and the model
alone, driven by `wrk`, in interleaved repeats.

    python -m loadtest.bench [--models models] [--workers N] [--repeats 3] [--duration-s 3]
                             [--concurrency 1,4,16,32,64] [--rates 0.25,0.5,0.75] [--compare CHECKOUT]

Measures, on the held-out requests of the newest model (real users, real 50-candidate lists):
  model    the service's model wrapper (encode + ONNX Runtime + top-k) and ONNX Runtime alone, in-process, one
           thread, batch 1..128: wall time and CPU per list
  service  `python -m service` with RERANK_WORKERS=1 and =N, features from a real redis-server
  ceiling  HTTP + JSON parse + a fixed answer (loadtest/servers.py), 1 and N processes on one SO_REUSEPORT port
Closed loop: `wrk` (C, one thread, its own process) with a Lua script cycling through the held-out bodies, at
each connection count. Open loop: the load client (`loadtest/client.py`, uvloop, its own process) at fixed rates, set as
fractions of the 1-worker service's best closed-loop throughput in the first repeat. Every configuration runs
once per repeat, the repeats interleaved, so a slow period of the machine hits all of them alike.
Client-side latency is wrk's (exact, HdrHistogram); server-side latency is the service's own handler histogram
(summed over workers). CPU: /proc of every server process, and wrk's own rusage.
--compare CHECKOUT adds the service from another checkout of this repository (a `git worktree` at another commit)
as `service-B` with 1 and N workers, run with the same model, Redis and Python, interleaved with the rest in every
closed-loop repeat: a same-time A/B, since this machine drifts between runs more than most changes move it.
Writes reports/benchmark.json; bench_report.py turns it into reports/benchmark.md and reports/benchmark.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import bench_report, heldout
from loadtest.levels import best_under, closed_level, open_level, wrk_files
from loadtest.measure import machine, percentiles_ms, timed
from loadtest.targets import Target, redis, started
from service.config import usable_cores
from service.model import RerankModel, find_version


def model_only(folder: Path, batch_sizes: list[int], min_s: float) -> list[dict[str, Any]]:
    """The service's model wrapper (encode + run + top-k) and ONNX Runtime alone on held-out lists with real
    user features, one ONNX Runtime thread (as each of N workers runs), per batch size: wall time percentiles
    and this process's CPU per list."""
    model = RerankModel(folder, "cpu", intra_op_threads=1)
    model.warm_up()
    jobs, _ = heldout.jobs(folder)
    rows = []
    for b in batch_sizes:
        groups = [jobs[i : i + b] for i in range(0, len(jobs) - b + 1, b)][:32]
        feeds = [model.encode(g)[0] for g in groups]
        run, run_cpu = timed(model.infer, feeds, min_s)
        rank, rank_cpu = timed(model.rank, groups, min_s)
        rows.append({"batch": b, "ort": percentiles_ms(run), "rank": percentiles_ms(rank),
                     "ort_cpu_us_per_list": round(run_cpu / (len(run) * b) * 1e6, 1),
                     "rank_cpu_us_per_list": round(rank_cpu / (len(rank) * b) * 1e6, 1),
                     "rank_lists_per_s": round(b / float(np.mean(rank)), 1)})
        r = rows[-1]
        print(f"model batch {b:3d}: wrapper p50 {r['rank']['p50_ms']:.3f} ms, {r['rank_cpu_us_per_list']:.0f} us "
              f"CPU/list; onnxruntime p50 {r['ort']['p50_ms']:.3f} ms", flush=True)
    return rows


def checkout_name(path: Path) -> str:
    """``path`` and its commit, for the report."""
    rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{path} @ {rev.stdout.strip()}" if rev.returncode == 0 else str(path)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (newest version used)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where benchmark.{md,json,png} go")
    parser.add_argument("--workers", type=int, default=0, help="the N of N workers (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every level")
    parser.add_argument("--concurrency", default="1,4,16,64,256", help="closed-loop connection counts")
    parser.add_argument("--duration-s", type=float, default=3.0, help="seconds per level")
    parser.add_argument("--rates", default="0.25,0.5,0.75",
                        help="open-loop rates, as fractions of the 1-worker service's best closed-loop throughput")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128", help="model-only batch sizes")
    parser.add_argument("--model-min-s", type=float, default=1.0, help="seconds of model-only timing per size")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="also run the service from this other checkout (e.g. a git worktree), as service-B")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite benchmark.md and .png from an existing benchmark.json")
    return parser.parse_args(argv)


def run_repeats(args: argparse.Namespace, folder: Path, workers: int) -> list[dict[str, Any]]:
    """Every target up at once, then per repeat every closed-loop level on every target in turn, and the open-loop
    rates (fractions of the first repeat's best 1-worker throughput) on the two services."""
    levels = [int(x) for x in args.concurrency.split(",")]
    fractions = [float(x) for x in args.rates.split(",") if x]
    repeats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, redis(folder) as redis_url, contextlib.ExitStack() as stack:
        script, bodies = wrk_files(Path(tmp), folder)
        targets = [stack.enter_context(started(Target(kind, w), folder, redis_url, Path(tmp) / f"{kind}-{w}.log"))
                   for kind in ("service", "ceiling") for w in (1, workers)]
        if args.compare is not None:
            targets += [stack.enter_context(started(Target("service", w, tag="B", cwd=args.compare.resolve()), folder,
                                                    redis_url, Path(tmp) / f"service-B-{w}.log"))
                        for w in (1, workers)]
        rates: list[float] = []
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            rep: dict[str, Any] = {"closed": [], "open": []}
            for c in levels:
                rep["closed"] += [closed_level(target, c, args.duration_s, script, bodies) for target in targets]
            if not rates:
                best = best_under([lv for lv in rep["closed"] if lv["target"] == "service x1"])
                rates = [f * best["throughput_rps"] for f in fractions] if best else []
            for rate in rates:
                rep["open"] += [open_level(target, rate, args.duration_s, args.models) for target in targets[:2]]
            repeats.append(rep)
    return repeats


def report(result: dict[str, Any], out: Path) -> None:
    """Summary and admission table into ``result``, then benchmark.json, .md and .png in ``out``."""
    result["summary"] = bench_report.summarise(result["repeats"], result["model"], result["workers"])
    result["admission"] = bench_report.admission(result["repeats"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    bench_report.write_report(result, out, bench_report.plot(result, out / "benchmark.png"))


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.replot:
        report(json.loads((args.out / "benchmark.json").read_text()), args.out)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    t0 = time.time()
    workers = args.workers or usable_cores()
    folder = find_version(args.models)
    print(f"model {folder.name}; {workers} workers; wrk levels {args.concurrency}; {args.repeats} repeats", flush=True)
    model = model_only(folder, [int(x) for x in args.batch_sizes.split(",")], args.model_min_s)
    repeats = run_repeats(args, folder, workers)
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("RERANK_"))
    result = {"command": " ".join([*([settings] if settings else []), "python -m loadtest.bench",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "model_version": folder.name, "workers": workers, "duration_s": args.duration_s,
              **({"compare": checkout_name(args.compare)} if args.compare is not None else {}),
              "repeats_n": args.repeats, "model": model, "repeats": repeats, "wall_s": round(time.time() - t0, 1)}
    report(result, args.out)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}/benchmark.json and benchmark.md")


if __name__ == "__main__":
    main()

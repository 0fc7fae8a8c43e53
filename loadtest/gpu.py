"""`make bench-gpu`: the service and its model on ONNX Runtime's CUDA provider, beside the CPU provider on the same
host.

    python -m loadtest.gpu [--models models] [--out reports] [--workers 1,2,4,8] [--concurrency 1,16,64,256]
                           [--batch-sizes 1,2,4,...,1024] [--duration-s 2] [--repeats 2] [--providers cuda,cpu]

Measures, on the held-out requests of the newest model:
  model      ONNX Runtime alone, per batch size: CUDA fp32, CUDA fp16 (the graph converted with onnxruntime's own
             float16 tool, inputs and outputs kept fp32) and the CPU provider with one thread (up to
             --cpu-batch-max); wall time per call, host copies included, as the service calls it
  agreement  every held-out list through each of them: the same top 6 in the same order, the same top 6 as a set,
             the mean overlap of the top 6, the largest logit difference, and NDCG@6 against the held-out labels
  memory     GPU memory per process (nvidia-smi): this process with its CUDA sessions, and every service worker
  service    `python -m service` with RERANK_PROVIDERS=cuda and =cpu at each worker count, the providers that
             really run read from its /metrics, driven by wrk closed loop (--wrk-threads threads) in interleaved
             repeats; admission is fixed and high (RERANK_MAX_IN_FLIGHT=4096) so the figures are capacity, not
             what the deadline rule admits
With `--providers cpu` it runs on any machine (CI has no GPU); with cuda it exits 2 when the CUDA provider is not
what runs (onnxruntime-gpu missing, or no GPU), since `get_available_providers()` lists CUDA even with no GPU.
Writes gpu.md and gpu.json under --out (the JSON after every stage, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from loadtest import gpu_report, heldout
from loadtest.levels import closed_level, wrk_files
from loadtest.measure import machine, percentiles_ms, timed
from loadtest.scrape import scrape
from loadtest.targets import Target, started
from service.model import Job, RerankModel, find_version
from training import metrics

TOP = 6
CUDA = "CUDAExecutionProvider"


# ------------------------------------------------------------------------------------------------ the GPU


def nvidia_smi(query: str, kind: str = "gpu") -> list[list[str]]:
    """Rows of `nvidia-smi --query-<kind>=<query>`; empty when nvidia-smi is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", f"--query-{kind}={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    if out.returncode:
        return []
    return [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def gpu_info() -> dict[str, Any]:
    rows = nvidia_smi("name,driver_version,memory.total,memory.used")
    if not rows:
        return {"gpu": "none seen (nvidia-smi missing or failed)"}
    name, driver, total, used = rows[0]
    return {"gpu": name, "driver": driver, "memory_total_mib": int(total), "memory_used_mib": int(used)}


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory each process holds (empty where nvidia-smi cannot see processes)."""
    out = {}
    for row in nvidia_smi("pid,used_memory", kind="compute-apps"):
        with contextlib.suppress(ValueError, IndexError):
            out[int(row[0])] = int(row[1])
    return out


def gpu_used_mib() -> int | None:
    rows = nvidia_smi("memory.used")
    return int(rows[0][0]) if rows else None


# ------------------------------------------------------------------------------------------------ sessions


def fp16_graph(src: Path, dst: Path) -> Path | None:
    """``src`` with its float weights and arithmetic in fp16; inputs and output stay fp32, so the service's feed
    and parsing are unchanged (onnxruntime's own converter). None without the `onnx` package it needs."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        print(f"no fp16 rows: {exc} (pip install onnx)", flush=True)
        return None
    if not dst.exists():
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def session(graph: Path, provider: str, threads: int = 1) -> ort.InferenceSession:
    """A session set up as the service sets up its own (service/model.py), on one provider."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [CUDA, "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(graph), options, providers=providers)


def runs_on_cuda(s: ort.InferenceSession) -> bool:
    return s.get_providers()[0] == CUDA


# ---------------------------------------------------------------------------------------- model and agreement


def batches(model: RerankModel, jobs: list[Job], b: int, groups: int = 16) -> list[dict[str, np.ndarray]]:
    """Up to ``groups`` feeds of ``b`` held-out lists each, cycling through the lists when ``b`` exceeds them."""
    need = b * groups
    cycled = (jobs * (need // len(jobs) + 1))[:need]
    return [model.encode(cycled[i : i + b])[0] for i in range(0, need, b)][: max(1, min(groups, 4096 // b))]


def time_model(sessions: dict[str, ort.InferenceSession], model: RerankModel, jobs: list[Job],
               sizes: list[int], cpu_batch_max: int, min_s: float) -> list[dict[str, Any]]:
    """Per batch size and session: wall time of one ``run`` (host -> device copies included) and lists/s."""
    rows = []
    for b in sizes:
        feeds = batches(model, jobs, b)
        row: dict[str, Any] = {"batch": b}
        for name, s in sessions.items():
            if name.startswith("cpu") and b > cpu_batch_max:
                continue
            calls, _ = timed(lambda f, s=s: s.run(["logits"], f), feeds, min_s, min_calls=10)
            row[name] = {**percentiles_ms(calls), "lists_per_s": round(b / statistics.median(calls), 1)}
        rows.append(row)
        print(f"model batch {b:4d}: " + "  ".join(f"{n} p50 {row[n]['p50_ms']:.3f} ms" for n in sessions if n in row),
              flush=True)
    return rows


def logits_of(s: ort.InferenceSession, model: RerankModel, jobs: list[Job], batch: int = 128) -> np.ndarray:
    """(lists, candidates) logits of every job, in order."""
    out = [s.run(["logits"], model.encode(jobs[i : i + batch])[0])[0] for i in range(0, len(jobs), batch)]
    width = max(o.shape[1] for o in out)
    return np.concatenate([np.pad(o, ((0, 0), (0, width - o.shape[1])), constant_values=-np.inf) for o in out])


def top(logits: np.ndarray, lengths: list[int], k: int = TOP) -> list[np.ndarray]:
    """Each list's top-k positions, best first, ties in request order (as the service ranks)."""
    return [np.argsort(-row[:n], kind="stable")[:k] for row, n in zip(logits, lengths, strict=True)]


def ndcg(logits: np.ndarray, labels: list[list[int]], lengths: list[int], k: int = TOP) -> float:
    """Mean N@k of the lists ranked by ``logits``, as the offline report computes it (``training.metrics``: a list
    without a positive scores 0)."""
    width = logits.shape[1]
    z = np.array([np.pad(np.asarray(lab, dtype=np.float64), (0, width - len(lab))) for lab in labels])
    mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
    return float(metrics.ndcg_at_k(logits, z, k, mask).mean())


def agreement(reference: np.ndarray, other: np.ndarray, lengths: list[int]) -> dict[str, float]:
    """How far ``other``'s ranking is from ``reference``'s, over the same lists."""
    a, b = top(reference, lengths), top(other, lengths)
    finite = np.isfinite(reference) & np.isfinite(other)
    return {"same_top6_order": round(float(np.mean([np.array_equal(x, y) for x, y in zip(a, b, strict=True)])), 4),
            "same_top6_set": round(float(np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)])), 4),
            "mean_top6_overlap": round(float(np.mean([len(set(x) & set(y)) / TOP for x, y in zip(a, b, strict=True)])),
                                       4),
            "max_abs_logit_diff": float(np.max(np.abs(reference[finite] - other[finite]))),
            "non_finite_logits": int(np.sum(~np.isfinite(other[:, : min(lengths)])))}


def model_stage(folder: Path, providers: list[str], sizes: list[int], cpu_batch_max: int, min_s: float,
                tmp: Path) -> dict[str, Any]:
    model = RerankModel(folder, "cpu", intra_op_threads=1)  # the encoder of feeds; its session is the CPU row
    graph = folder / model.manifest.graph.file
    used0 = gpu_used_mib()
    half = fp16_graph(graph, tmp / "model.fp16.onnx")
    sessions: dict[str, ort.InferenceSession] = {}
    if "cuda" in providers:
        sessions["cuda fp32"] = session(graph, "cuda")
        if half is not None:
            sessions["cuda fp16"] = session(half, "cuda")
        for name, s in sessions.items():
            if not runs_on_cuda(s):
                print(f"{name}: ONNX Runtime runs {s.get_providers()}, not CUDA (a GPU it can use? the CUDA "
                      "libraries it links?); measuring nothing", file=sys.stderr)
                sys.exit(2)
    if "cpu" in providers:
        sessions["cpu fp32"] = model.session
        if half is not None:
            sessions["cpu fp16"] = session(half, "cpu")
    jobs, labels = heldout.jobs(folder, TOP)
    lengths = [len(j.item_ids) for j in jobs]
    logits = {name: logits_of(s, model, jobs) for name, s in sessions.items()}
    reference = "cpu fp32" if "cpu fp32" in logits else "cuda fp32"
    quality = {name: {"ndcg@6": round(ndcg(lg, labels, lengths), 4),
                      **({} if name == reference else {f"vs {reference}": agreement(logits[reference], lg, lengths)})}
               for name, lg in logits.items()}
    if "cuda fp32" in logits and "cuda fp16" in logits:
        quality["cuda fp16"]["vs cuda fp32"] = agreement(logits["cuda fp32"], logits["cuda fp16"], lengths)
    offline = [row["offline_topk"][:TOP] for row in heldout.records(folder)]
    for name, lg in logits.items():
        got = [[job.item_ids[i] for i in order] for job, order in zip(jobs, top(lg, lengths), strict=True)]
        quality[name]["same_top6_as_export"] = round(float(np.mean(
            [g == off for g, off in zip(got, offline, strict=True)])), 4)
    for name, q in quality.items():
        print(f"{name}: {q}", flush=True)
    timing = time_model(sessions, model, jobs, sizes, cpu_batch_max, min_s)
    mine = gpu_memory_by_pid().get(os.getpid())
    return {"lists": len(jobs), "reference": reference, "quality": quality, "timing": timing,
            "providers": {name: s.get_providers() for name, s in sessions.items()},
            "gpu_memory": {"this_process_mib": mine, "used_before_mib": used0, "used_after_mib": gpu_used_mib(),
                           "sessions": [n for n in sessions if n.startswith("cuda")],
                           "largest_batch": max(sizes)}}


# ----------------------------------------------------------------------------------------------- service


def providers_running(url: str) -> str:
    """The providers label of rerank_model_info, as the answering worker reports it."""
    return scrape(url).label("rerank_model_info", "providers") or "unknown"


def service_stage(folder: Path, providers: list[str], workers: list[int], levels: list[int], repeats: int,
                  duration_s: float, wrk_threads: int, tmp: Path, save: Any) -> dict[str, Any]:
    script, bodies = wrk_files(tmp, folder)
    env = {"RERANK_ADMISSION": "fixed", "RERANK_MAX_IN_FLIGHT": "4096"}
    configs: list[dict[str, Any]] = []
    out: dict[str, Any] = {"env": env, "levels": levels, "repeats_n": repeats, "duration_s": duration_s,
                           "wrk_threads": wrk_threads, "configs": configs, "closed": []}
    with contextlib.ExitStack() as stack:
        targets = []
        for p in providers:
            for w in workers:
                before = gpu_used_mib()
                t0 = time.perf_counter()
                target = stack.enter_context(started(Target("service", w, tag=p), folder, "",
                                                     tmp / f"service-{p}-{w}.log", {**env, "RERANK_PROVIDERS": p}))
                assert target.service is not None
                by_pid = gpu_memory_by_pid()
                configs.append({"target": target.name, "providers": providers_running(target.url),
                                "start_s": round(time.perf_counter() - t0, 2),
                                "gpu_mib_per_worker": [by_pid.get(pid) for pid in target.service.pids()],
                                "gpu_used_delta_mib": (gpu_used_mib() or 0) - (before or 0)})
                print(f"{target.name}: {configs[-1]}", flush=True)
                targets.append(target)
        save()
        for r in range(repeats):
            print(f"repeat {r + 1}/{repeats}", flush=True)
            for c in levels:
                for target in targets:
                    out["closed"].append({"repeat": r, **closed_level(target, c, duration_s, script, bodies,
                                                                      wrk_threads)})
            save()
        by_pid = gpu_memory_by_pid()
        for cfg, target in zip(configs, targets, strict=True):
            assert target.service is not None
            cfg["gpu_mib_per_worker_after"] = [by_pid.get(pid) for pid in target.service.pids()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (newest version used)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where gpu.{md,json} go")
    parser.add_argument("--providers", default="cuda,cpu", help="cuda and/or cpu")
    parser.add_argument("--workers", default="1,2,4,8", help="service worker counts")
    parser.add_argument("--concurrency", default="1,16,64,256", help="wrk connection counts")
    parser.add_argument("--wrk-threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256,512,1024")
    parser.add_argument("--cpu-batch-max", type=int, default=128, help="largest batch timed on the CPU provider")
    parser.add_argument("--model-min-s", type=float, default=0.3, help="seconds of timing per batch size")
    parser.add_argument("--skip-service", action="store_true")
    args = parser.parse_args()
    providers = [p for p in args.providers.split(",") if p]
    if not set(providers) <= {"cuda", "cpu"}:
        sys.exit(f"--providers: {args.providers!r}: each must be cuda or cpu")
    if "cuda" in providers and CUDA not in ort.get_available_providers():
        print(f"this onnxruntime ({ort.__version__}) has no CUDA provider: pip install onnxruntime-gpu "
              f"(the `gpu` extra) in its own environment", file=sys.stderr)
        sys.exit(2)
    if not args.skip_service and shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `make wrk` installs it (apt-get install wrk)")
    t0 = time.time()
    folder = find_version(args.models)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": " ".join(["python -m loadtest.gpu", *sys.argv[1:]]),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": {**machine(), **gpu_info()}, "model_version": folder.name}

    def save() -> None:
        result["wall_s"] = round(time.time() - t0, 1)
        (args.out / "gpu.json").write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        result["model"] = model_stage(folder, providers, [int(x) for x in args.batch_sizes.split(",")],
                                      args.cpu_batch_max, args.model_min_s, Path(tmp))
        save()
        if not args.skip_service:
            result["service"] = service_stage(folder, providers, [int(x) for x in args.workers.split(",")],
                                              [int(x) for x in args.concurrency.split(",")], args.repeats,
                                              args.duration_s, args.wrk_threads, Path(tmp), save)
    save()
    gpu_report.write_report(result, args.out)
    print(f"wrote {args.out}/gpu.json and gpu.md in {result['wall_s']} s")


if __name__ == "__main__":
    main()

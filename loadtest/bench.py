"""`make bench`: the service beside this machine's own ceilings and beside a naive server, in one run.

    python -m loadtest.bench [--models models] [--duration-s 4] [--concurrency 1,2,4,8,16,32,64]

Measures, on the held-out requests of the newest model (real users, real 50-candidate lists):
  (a) ceiling  HTTP + JSON parse + a fixed answer, same uvicorn settings (loadtest/servers.py)
  (b) model    the ONNX graph alone (session.run) and the service's model wrapper (encode + run + top-k),
               in-process, at batch 1..128
  (c) service  the real service end to end, features from a real redis-server when one is installed
  (d) naive    FastAPI + pydantic body + torch eager, one request at a time
HTTP latency is server side (loadtest/servers.py ``Timed``: exact percentiles of raw samples); the service's
own Prometheus histogram is read too, as a cross-check. The load generator is a closed loop of keep-alive
connections in this process, sharing the machine's cores with the server; its CPU use is reported.
Writes reports/benchmark.md, reports/benchmark.json and reports/benchmark.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.replay import drive, histograms, load_bodies, quantile
from service.features import read_snapshot
from service.model import Job, RerankModel, find_version

P99_BUDGET_MS = 10.0
STAGES = {"rerank_request_duration_seconds": "handler", "rerank_feature_duration_seconds": "features",
          "rerank_queue_wait_seconds": "queue_wait", "rerank_inference_duration_seconds": "inference_batch"}
PACED_GAP_S = 0.001
TARGETS = {"throughput_vs_naive": 3.0, "latency_vs_ceiling_plus_model": 1.3, "overhead_ms": 0.3}


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    versions = {}
    for name in ("onnxruntime", "torch", "fastapi", "uvicorn", "numpy"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "os": platform.platform(),
            "python": platform.python_version(), "gpu": "none used (CPU execution provider)", **versions}


# -------------------------------------------------------------------------------------------- model only


def percentiles_ms(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=np.float64) * 1000
    if not len(a):
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "p99.9_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "p99.9_ms": round(float(np.percentile(a, 99.9)), 4)}


def time_calls(fn: Any, args: list[Any], min_s: float, min_calls: int = 30) -> list[float]:
    for a in args[:5]:
        fn(a)
    out: list[float] = []
    t_end = time.perf_counter() + min_s
    i = 0
    while len(out) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn(args[i % len(args)])
        out.append(time.perf_counter() - t0)
        i += 1
    return out


def model_only(folder: Path, batch_sizes: list[int], min_s: float
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """ONNX Runtime alone and the service's model wrapper, per batch size, on held-out lists, back to back;
    and batch 1 again with the machine idle between calls, as a request at low load sees it."""
    model = RerankModel(folder, "cpu")
    model.warm_up()
    users = read_snapshot(folder / "user_features.jsonl")
    jobs = []
    for line in (folder / "heldout.jsonl").read_text().splitlines():
        req = json.loads(line)["request"]
        cands = req["candidates"]
        jobs.append(Job([c["item_id"] for c in cands], np.array([c["score"] for c in cands], np.float32),
                        users[req["user_id"]], 6))
    def paced(feed: dict[str, np.ndarray]) -> None:
        time.sleep(PACED_GAP_S)
        t0 = time.perf_counter()
        model.infer(feed)
        paced_s.append(time.perf_counter() - t0)

    paced_s: list[float] = []
    time_calls(paced, [model.encode([j])[0] for j in jobs[:64]], min_s)
    paced_row = {"batch": 1, "gap_ms": PACED_GAP_S * 1000, "ort": percentiles_ms(paced_s[5:])}
    print(f"model batch 1 paced ({PACED_GAP_S * 1000:g} ms idle between calls): onnxruntime p50 "
          f"{paced_row['ort']['p50_ms']:.3f} ms", flush=True)
    rows = []
    for b in batch_sizes:
        groups = [jobs[i : i + b] for i in range(0, len(jobs) - b + 1, b)][:32]
        feeds = [model.encode(g)[0] for g in groups]
        run = time_calls(model.infer, feeds, min_s)
        rank = time_calls(model.rank, groups, min_s)
        rows.append({"batch": b, "ort": percentiles_ms(run), "rank": percentiles_ms(rank),
                     "ort_lists_per_s": round(b / float(np.mean(run)), 1),
                     "rank_lists_per_s": round(b / float(np.mean(rank)), 1)})
        print(f"model batch {b:3d}: onnxruntime p50 {rows[-1]['ort']['p50_ms']:.3f} ms, "
              f"wrapper p50 {rows[-1]['rank']['p50_ms']:.3f} ms, {rows[-1]['ort_lists_per_s']:.0f} lists/s", flush=True)
    return rows, paced_row


# ------------------------------------------------------------------------------------------------ HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=timeout).read())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(kind: str, models: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.servers", kind, "--port", str(port),
                             "--models", str(models)], env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {proc.returncode}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/readyz", timeout=1).status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server not ready after 180 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def redis(folder: Path, models: Path) -> Iterator[str]:
    """A loopback redis-server loaded with the model's feature snapshot; empty URL when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not found: the service runs on its in-process cache and snapshot", flush=True)
        yield ""
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                    break
                time.sleep(0.05)
            subprocess.run([sys.executable, "-m", "service", "load-features"], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "RERANK_REDIS_URL": url, "RERANK_MODEL_DIR": str(folder)})
            yield url
        finally:
            proc.kill()
            proc.wait()


def http_levels(kind: str, url: str, pid: int, bodies: list[bytes], levels: list[int], duration_s: float
                ) -> list[dict[str, Any]]:
    asyncio.run(drive(url, bodies, 4, duration_s=min(duration_s, 2.0)))  # warm-up, not recorded
    out = []
    for c in levels:
        start = get_json(f"{url}/bench/latency?start=0")["count"]
        prom_before = histograms(url, STAGES) if kind == "service" else {}
        server_cpu0 = cpu_seconds(pid)
        tally, wall, cpu = asyncio.run(drive(url, bodies, c, duration_s=duration_s))
        server_cpu = cpu_seconds(pid) - server_cpu0
        samples = get_json(f"{url}/bench/latency?start={start}")["samples_s"]
        answered = sum(tally.statuses.values())
        row = {"concurrency": c, "requests": answered, "wall_s": round(wall, 3),
               "throughput_rps": round(answered / wall, 1), **percentiles_ms(samples),
               "mean_ms": round(float(np.mean(samples)) * 1000, 4) if samples else float("nan"),
               "statuses": {str(k): v for k, v in sorted(tally.statuses.items())}, "fallbacks": tally.fallbacks,
               "client": percentiles_ms(tally.latencies_s),
               "client_cpu_share": round(cpu / wall, 3),
               "server_cpu_us_per_request": round(server_cpu / max(answered, 1) * 1e6, 1),
               "server_cores_busy": round(server_cpu / wall, 2)}
        if kind == "service":  # where the time goes, from the service's own stage histograms
            prom_after = histograms(url, STAGES)
            for name, label in STAGES.items():
                row[label] = {f"p{q * 100:g}_ms": round(quantile(prom_before[name], prom_after[name], q) * 1000, 3)
                              for q in (0.5, 0.99)}
        out.append(row)
        print(f"{kind:8s} c={c:3d}: {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:.3f}  "
              f"p99 {row['p99_ms']:.3f}  p99.9 {row['p99.9_ms']:.3f} ms (client p99 {row['client']['p99_ms']:.3f})  "
              f"statuses {row['statuses']}  "
              f"server {row['server_cpu_us_per_request']:.0f} us CPU/req on {row['server_cores_busy']:.2f} cores  "
              f"client cpu {row['client_cpu_share']:.2f}", flush=True)
    return out


# --------------------------------------------------------------------------------------------- summary


def best_under(levels: list[dict[str, Any]], p99_ms: float = P99_BUDGET_MS) -> dict[str, Any] | None:
    """The level with the highest throughput that answered only 2xx and whose p99 stays within ``p99_ms``
    both server side and as the client saw it. The client's view matters for a server that takes one
    request at a time: its queue sits in the socket, before the app (and the server-side clock) starts."""
    ok = [lv for lv in levels if max(lv["p99_ms"], lv["client"]["p99_ms"]) <= p99_ms
          and set(lv["statuses"]) <= {"200"}]
    return max(ok, key=lambda lv: lv["throughput_rps"]) if ok else None


def summarise(http: dict[str, list[dict[str, Any]]], model: list[dict[str, Any]],
              paced: dict[str, Any] | None = None) -> dict[str, Any]:
    best = {kind: best_under(levels) for kind, levels in http.items()}
    rps = {kind: (b["throughput_rps"] if b else 0.0) for kind, b in best.items()}
    c1 = {kind: next(lv for lv in levels if lv["concurrency"] == 1) for kind, levels in http.items()}
    b1 = next(r for r in model if r["batch"] == 1)
    ort_b1, rank_b1 = b1["ort"]["p50_ms"], b1["rank"]["p50_ms"]
    paced_b1 = paced["ort"]["p50_ms"] if paced else None
    bound = c1["ceiling"]["p50_ms"] + ort_b1
    ratio = rps["service"] / rps["naive"] if rps["naive"] else float("inf")
    overhead = c1["service"]["p50_ms"] - ort_b1
    return {
        "throughput_at_p99_le_10ms": {k: {"rps": rps[k], "concurrency": b["concurrency"] if b else None}
                                      for k, b in best.items()},
        "service_vs_naive_throughput": round(ratio, 2),
        "service_vs_ceiling_throughput": round(rps["service"] / rps["ceiling"], 3) if rps["ceiling"] else None,
        "c1_p50_ms": {k: v["p50_ms"] for k, v in c1.items()},
        "model_b1_p50_ms": {"onnxruntime": ort_b1, "wrapper": rank_b1, "onnxruntime_paced": paced_b1},
        "c1_latency_bound_ms": round(bound, 4),
        "c1_latency_bound_paced_ms": round(c1["ceiling"]["p50_ms"] + paced_b1, 4) if paced_b1 else None,
        "service_c1_p50_over_bound": round(c1["service"]["p50_ms"] / bound, 3),
        "non_model_overhead_ms": round(overhead, 4),
        "non_model_overhead_beyond_ceiling_ms": round(overhead - c1["ceiling"]["p50_ms"], 4),
        "targets": {
            "throughput_vs_naive >= 3x": ratio >= TARGETS["throughput_vs_naive"],
            "c1 p50 <= 1.3 x (ceiling + model)": c1["service"]["p50_ms"] <= 1.3 * bound,
            "non-model overhead <= 0.3 ms": overhead <= TARGETS["overhead_ms"],
        },
    }


def plot(http: dict[str, list[dict[str, Any]]], model: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    for (kind, levels), color in zip(http.items(), ("tab:gray", "tab:blue", "tab:red"), strict=False):
        x = [lv["throughput_rps"] for lv in levels]
        p99 = [max(lv["p99_ms"], lv["client"]["p99_ms"]) for lv in levels]
        ax.plot(x, p99, "o-", color=color, label=f"{kind} p99 (worse of server, client)")
        ax.plot(x, [lv["p50_ms"] for lv in levels], "s--", color=color, alpha=0.6, label=f"{kind} p50 (server)")
        for lv, y in zip(levels, p99, strict=True):
            ax.annotate(str(lv["concurrency"]), (lv["throughput_rps"], y), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(P99_BUDGET_MS, color="k", lw=0.8, ls=":", label="p99 budget 10 ms")
    ax.set(xlabel="throughput (requests/s)", ylabel="latency (ms, log)", yscale="log",
           title="Throughput vs latency (labels: connections)")
    ax.legend(fontsize=8)
    sizes = [r["batch"] for r in model]
    bx.plot(sizes, [r["ort_lists_per_s"] for r in model], "o-", label="ONNX Runtime alone")
    bx.plot(sizes, [r["rank_lists_per_s"] for r in model], "s--", label="model wrapper (encode + run + top-k)")
    bx.set(xlabel="batch size (lists)", ylabel="lists/s", xscale="log", title="Model alone, CPU")
    bx.set_xticks(sizes, [str(s) for s in sizes])
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def fmt(v: Any) -> str:
    return f"{v:,.3f}" if isinstance(v, float) else str(v)


def write_report(result: dict[str, Any], out: Path, plotted: bool) -> None:
    m, s, http = result["machine"], result["summary"], result["http"]
    lines = ["# Benchmark: service vs HTTP ceiling, model alone and a naive server", "",
             f"Generated by `{result['command']}` (`make bench`) on {result['date']} in {result['wall_s']:.0f} s; "
             "do not edit by hand.",
             "", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += ["", "## Summary", "",
              f"Throughput at p99 <= {P99_BUDGET_MS:g} ms (best closed-loop level with only 2xx answers and p99 "
              "within budget both server side and as the client saw it):", "",
              "| server | req/s | at connections | p50 at 1 connection (ms) |", "|---|---|---|---|"]
    for kind, b in s["throughput_at_p99_le_10ms"].items():
        lines.append(f"| {kind} | {b['rps']:,.1f} | {b['concurrency']} | {s['c1_p50_ms'][kind]:.3f} |")
    t = s["targets"]
    lines += ["", "| target | measured | met |", "|---|---|---|",
              f"| service >= 3x naive throughput at p99 <= 10 ms | {s['service_vs_naive_throughput']}x | "
              f"{'yes' if t['throughput_vs_naive >= 3x'] else '**no**'} |",
              f"| service p50 at 1 connection <= 1.3 x (ceiling p50 + model batch-1 p50) | "
              f"{s['c1_p50_ms']['service']:.3f} ms = {s['service_c1_p50_over_bound']}x of "
              f"{s['c1_latency_bound_ms']:.3f} ms | {'yes' if t['c1 p50 <= 1.3 x (ceiling + model)'] else '**no**'} |",
              f"| non-model overhead (service p50 - ONNX Runtime batch-1 p50) <= 0.3 ms | "
              f"{s['non_model_overhead_ms']:.3f} ms, of which beyond the HTTP ceiling "
              f"{s['non_model_overhead_beyond_ceiling_ms']:.3f} ms | "
              f"{'yes' if t['non-model overhead <= 0.3 ms'] else '**no**'} |", "",
              f"Service throughput at p99 <= 10 ms is {s['service_vs_ceiling_throughput']} of the HTTP ceiling's. "
              f"With the model's batch-1 time measured as a lone request meets it (idle machine between calls, "
              f"below), the one-connection bound is {s['c1_latency_bound_paced_ms']} ms and the service's p50 is "
              f"{s['c1_p50_ms']['service'] / (s['c1_latency_bound_paced_ms'] or float('nan')):.2f}x of it.", ""]
    if plotted:
        lines += ["![throughput vs latency](benchmark.png)", ""]
    lines += ["## Model alone (ONNX Runtime, CPU, in-process)", "",
              "| batch | ORT p50 ms | ORT p99 ms | wrapper p50 ms | wrapper p99 ms | ORT lists/s | wrapper lists/s |",
              "|---|---|---|---|---|---|---|"]
    for r in result["model"]:
        lines.append(f"| {r['batch']} | {r['ort']['p50_ms']:.3f} | {r['ort']['p99_ms']:.3f} | "
                     f"{r['rank']['p50_ms']:.3f} | {r['rank']['p99_ms']:.3f} | {r['ort_lists_per_s']:,.0f} | "
                     f"{r['rank_lists_per_s']:,.0f} |")
    lines += ["", "## HTTP, per closed-loop level", "",
              "| server | connections | req/s | p50 ms | p99 ms | p99.9 ms | client p50 / p99 ms | server CPU µs/req "
              "| server cores busy | client CPU | statuses | fallbacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, levels in http.items():
        for lv in levels:
            lines.append(f"| {kind} | {lv['concurrency']} | {lv['throughput_rps']:,.1f} | {lv['p50_ms']:.3f} | "
                         f"{lv['p99_ms']:.3f} | {lv['p99.9_ms']:.3f} | {lv['client']['p50_ms']:.3f} / "
                         f"{lv['client']['p99_ms']:.3f} | {lv['server_cpu_us_per_request']:.0f} | "
                         f"{lv['server_cores_busy']:.2f} | {lv['client_cpu_share']:.0%} | {lv['statuses']} | "
                         f"{lv['fallbacks']} |")
    svc = http["service"]
    paced = result["model_paced"]
    lines += ["", "## Where the service's time goes", "",
              "Medians from the service's own stage histograms over the same levels (interpolated within "
              "buckets; `inference` is one whole batch: encode + ONNX Runtime + top-k, in the worker thread):", "",
              "| connections | handler p50 | features p50 | queue wait p50 | inference (batch) p50 | "
              "outside handler (ASGI p50 - handler p50) |", "|---|---|---|---|---|---|"]
    for lv in svc:
        lines.append(f"| {lv['concurrency']} | {lv['handler']['p50_ms']:.3f} | {lv['features']['p50_ms']:.3f} | "
                     f"{lv['queue_wait']['p50_ms']:.3f} | {lv['inference_batch']['p50_ms']:.3f} | "
                     f"{lv['p50_ms'] - lv['handler']['p50_ms']:.3f} |")
    lines += ["", f"ONNX Runtime at batch 1 back to back: p50 {result['model'][0]['ort']['p50_ms']:.3f} ms; with "
              f"{paced['gap_ms']:g} ms idle between calls (as at one connection): p50 {paced['ort']['p50_ms']:.3f} ms "
              f"/ p99 {paced['ort']['p99_ms']:.3f} ms.", ""]
    lines += ["## How it was measured", "",
              "- Each server runs alone in its own process under uvicorn with the service's settings (one process, "
              "uvloop, httptools, no access log), launched by `python -m loadtest.servers`.",
              "- Latency is server side: from uvicorn calling the app to the last response byte handed back "
              "(`loadtest/servers.py` `Timed`), raw samples, exact percentiles. It excludes the kernel and "
              "the HTTP parser, identically for all three servers. It also excludes time a request waits in "
              "the socket before the app is called, which is where a one-at-a-time server queues; so the "
              "10 ms budget is checked on the client's round trip too (client p50 / p99 column).",
              f"- Load: closed loop, N keep-alive connections, {result['duration_s']:g} s per level after a warm-up, "
              "requests cycling through the model's held-out lists (real users and their 50 candidates).",
              "- The load generator runs on the same cores as the server (\"client CPU\" = its share of one core), "
              "so every figure here is a lower bound on what the server does with the machine to itself.",
              f"- Service features: {result['features']}.",
              "- Model alone: `RerankModel.infer` (session.run) and `RerankModel.rank` (encode + run + top-k) on "
              "held-out lists with real user features, at least 1 s per batch size.",
              "- Naive: FastAPI with a pydantic body and the same trained weights in torch eager mode "
              "(`training.export.load_reranker`), called inline in an async handler, so one request at a time.",
              ""]
    (out / "benchmark.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"), help="model folder (newest version used)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where benchmark.{md,json,png} go")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="closed-loop connection counts")
    parser.add_argument("--duration-s", type=float, default=4.0, help="seconds per concurrency level")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128", help="model-only batch sizes")
    parser.add_argument("--model-min-s", type=float, default=1.0, help="seconds of model-only timing per size")
    parser.add_argument("--servers", default="ceiling,service,naive", help="which HTTP servers to run")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite benchmark.md and .png from an existing benchmark.json")
    args = parser.parse_args()
    if args.replot:
        result = json.loads((args.out / "benchmark.json").read_text())
        write_report(result, args.out, plot(result["http"], result["model"], args.out / "benchmark.png"))
        return
    t0 = time.time()
    folder = find_version(args.models)
    bodies = load_bodies(folder)
    levels = [int(x) for x in args.concurrency.split(",")]
    print(f"model {folder.name}: {len(bodies)} held-out requests", flush=True)
    model, paced = model_only(folder, [int(x) for x in args.batch_sizes.split(",")], args.model_min_s)
    http: dict[str, list[dict[str, Any]]] = {}
    with redis(folder, args.models) as redis_url:
        for kind in args.servers.split(","):
            env = {"RERANK_MODEL_DIR": str(folder), "RERANK_LOG_LEVEL": "warning", "RERANK_REDIS_URL": redis_url}
            with server(kind, args.models, env) as (url, pid):
                http[kind] = http_levels(kind, url, pid, bodies, levels, args.duration_s)
    result = {"command": " ".join(["python -m loadtest.bench", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "model_version": folder.name, "duration_s": args.duration_s,
              "features": ("real redis-server on loopback, snapshot loaded with `python -m service load-features`, "
                           "in-process cache in front" if redis_url else "in-process cache and snapshot (no Redis)"),
              "model": model, "model_paced": paced, "http": http}
    if {"ceiling", "service", "naive"} <= set(http):
        result["summary"] = summarise(http, model, paced)
    result["wall_s"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    if "summary" in result:
        write_report(result, args.out, plot(http, model, args.out / "benchmark.png"))
        print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}/benchmark.json" + (" and benchmark.md" if "summary" in result else ""))


if __name__ == "__main__":
    main()

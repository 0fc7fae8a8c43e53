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
each connection count. Open loop: the fault suite's uvloop generator (its own process) at fixed rates, set as
fractions of the 1-worker service's best closed-loop throughput in the first repeat. Every configuration runs
once per repeat, the repeats interleaved, so a slow period of the machine hits all of them alike.
Client-side latency is wrk's (exact, HdrHistogram); server-side latency is the service's own handler histogram
(summed over workers). CPU: /proc of every server process, and wrk's own rusage.
--compare CHECKOUT adds the service from another checkout of this repository (a `git worktree` at another commit)
as `service-B` with 1 and N workers, run with the same model, Redis and Python, interleaved with the rest in every
closed-loop repeat: a same-time A/B, since this machine drifts between runs more than most changes move it.
Writes reports/benchmark.md, reports/benchmark.json and reports/benchmark.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.faults import Load
from loadtest.procs import ServiceProcess, free_port
from loadtest.replay import histograms, load_bodies, quantile
from service.config import usable_cores
from service.features import read_snapshot
from service.model import Job, RerankModel, find_version

P99_BUDGET_MS = 10.0
HANDLER = "rerank_request_duration_seconds"
REFUSAL = "rerank_refusal_duration_seconds"  # the admission door's 429s (services that export it)
DEADLINE_S = 0.100  # the service's default deadline: the bodies carry no timeout_ms
# Admission targets (issue 24): where the Little's-law wait (connections / peak model answers/s) fits the deadline,
# refusals <= 1% of answers; where it does not, the door's 429 p99 <= 5 ms and >= 99% of admitted requests are
# answered by the model inside their deadline (not a deadline fallback).
ADMISSION = {"refusals_per_answer": 0.01, "refusal_p99_ms": 5.0, "admitted_on_time": 0.99}
TARGETS = {"workers_speedup": 1.5, "cpu_per_request_vs_parts": 1.2, "c1_p50_vs_bound": 1.3}
WRK_SCRIPT = r"""
local requests, i = {}, 0
init = function(args)
  local f = assert(io.open(args[1], "r"))
  for line in f:lines() do
    requests[#requests + 1] = wrk.format("POST", "/rerank", {["Content-Type"] = "application/json"}, line)
  end
  f:close()
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
done = function(summary, latency, requests)
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do p[#p + 1] = string.format('"%g": %d', q, latency:percentile(q)) end
  local e = summary.errors
  io.write(string.format('WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "mean_us": %.1f, "max_us": %d, "percentiles_us": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency.mean,
    latency.max, table.concat(p, ", ")))
end
"""


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    versions = {}
    for name in ("onnxruntime", "fastapi", "uvicorn", "numpy"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    wrk = (subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
           if shutil.which("wrk") else "not installed")
    return {"cpu": cpu, "cores": usable_cores(), "memory_mib": mem, "os": platform.platform(),
            "python": platform.python_version(), "gpu": "none used (CPU execution provider)", "wrk": wrk, **versions}


def percentiles_ms(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=np.float64) * 1000
    if not len(a):
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "p99.9_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "p99.9_ms": round(float(np.percentile(a, 99.9)), 4)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all threads (Linux /proc; 0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------------------------------- model only


def model_only(folder: Path, batch_sizes: list[int], min_s: float) -> list[dict[str, Any]]:
    """The service's model wrapper (encode + run + top-k) and ONNX Runtime alone on held-out lists with real
    user features, one ONNX Runtime thread (as each of N workers runs), per batch size: wall time percentiles
    and this process's CPU per list."""
    model = RerankModel(folder, "cpu", intra_op_threads=1)
    model.warm_up()
    jobs, _ = heldout_jobs(folder)
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


def heldout_jobs(folder: Path, k: int = 6) -> tuple[list[Job], list[list[int]]]:
    """The held-out requests as the model sees them (real user features from the snapshot), and their labels."""
    users = read_snapshot(folder / "user_features.jsonl")
    jobs, labels = [], []
    for line in (folder / "heldout.jsonl").read_text().splitlines():
        held = json.loads(line)
        req = held["request"]
        cands = req["candidates"]
        jobs.append(Job([c["item_id"] for c in cands], np.array([c["score"] for c in cands], np.float32),
                        users[req["user_id"]], k))
        labels.append(held["labels"])
    return jobs, labels


def timed(fn: Any, args: list[Any], min_s: float, min_calls: int = 30) -> tuple[list[float], float]:
    """Call ``fn`` over ``args`` for at least ``min_s`` (after 5 warm-up calls): wall seconds per call, and
    this process's CPU seconds over all the timed calls."""
    for a in args[:5]:
        fn(a)
    out: list[float] = []
    cpu0, t_end, i = time.process_time(), time.perf_counter() + min_s, 0
    while len(out) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn(args[i % len(args)])
        out.append(time.perf_counter() - t0)
        i += 1
    return out, time.process_time() - cpu0


def model_cpu_us_per_list(model: list[dict[str, Any]], batch: float) -> float:
    """The wrapper's CPU per list at a (mean) batch size, interpolated in log batch size."""
    sizes = np.log([r["batch"] for r in model])
    return float(np.interp(np.log(max(batch, 1.0)), sizes, [r["rank_cpu_us_per_list"] for r in model]))


# ------------------------------------------------------------------------------------------------ servers


@dataclass
class Target:
    """One server configuration under test: the service or the ceiling, with ``workers`` processes."""

    kind: str
    workers: int
    tag: str = ""  # tells apart two configurations of one kind ("cuda", "cpu"; "B" for --compare)
    cwd: Path | None = None  # the checkout whose service runs (None: this one)
    url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    service: ServiceProcess | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}{'-' + self.tag if self.tag else ''} x{self.workers}"

    def pids(self) -> list[int]:
        if self.service is not None:
            return sorted({self.service.pid, *self.service.pids()})
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())


@contextlib.contextmanager
def started(target: Target, folder: Path, redis_url: str, log: Path, env: dict[str, str] | None = None
            ) -> Iterator[Target]:
    """The target's processes, up and ready; the service gets ``env`` on top of the bench's settings."""
    if target.kind == "service":
        svc = ServiceProcess({"RERANK_MODEL_DIR": str(folder.resolve()), "RERANK_WORKERS": str(target.workers),
                              "RERANK_REDIS_URL": redis_url, "RERANK_LOG_LEVEL": "warning",
                              "RERANK_DRAIN_DELAY_S": "0", **(env or {})}, log=log, cwd=target.cwd)
        with svc:
            target.service, target.url = svc, svc.url
            yield target
        return
    port = free_port()
    target.url = f"http://127.0.0.1:{port}"
    out = log.open("ab")
    target.procs = [subprocess.Popen([sys.executable, "-m", "loadtest.servers", target.kind, "--port", str(port),
                                      "--reuse-port", "--bare"], stdout=out, stderr=out)
                    for _ in range(target.workers)]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert all(p.poll() is None for p in target.procs), f"{target.name} exited (log: {log})"
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{target.url}/readyz", timeout=1).status == 200:
                    break
            assert time.monotonic() < deadline, f"{target.name} not ready"
            time.sleep(0.1)
        time.sleep(1.0)  # the other copies import the same modules a moment later
        yield target
    finally:
        for p in target.procs:
            p.send_signal(signal.SIGTERM)
        for p in target.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        out.close()


@contextlib.contextmanager
def redis(folder: Path) -> Iterator[str]:
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


# --------------------------------------------------------------------------------------------- one level


def scrape(url: str) -> dict[str, Any]:
    """The service's counters and handler histogram, from one /metrics scrape (every worker summed)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()

    def total(name: str, labels: str = "") -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{?{labels}[^ ]*\}}? (\S+)$", text, re.M))

    hists = histograms(url, [HANDLER, REFUSAL])
    return {"2xx": total("rerank_requests_total", 'status="2xx"'),
            "requests": total("rerank_requests_total"), "fallbacks": total("rerank_fallbacks_total"),
            "batches": total("rerank_batch_size_count"), "batched": total("rerank_batch_size_sum"),
            "handler": hists[HANDLER], "refusal": hists[REFUSAL]}


def server_side(target: Target, before: dict[str, Any] | None) -> dict[str, Any]:
    if before is None or target.kind != "service":
        return {}
    after = scrape(target.url)
    batches = after["batches"] - before["batches"]
    refused = after["refusal"] and after["refusal"][float("inf")] - before["refusal"].get(float("inf"), 0.0)
    return {"server_p50_ms": round(quantile(before["handler"], after["handler"], 0.5) * 1000, 3),
            "refusal_p99_ms": round(quantile(before["refusal"], after["refusal"], 0.99) * 1000, 3) if refused else None,
            "answers": int(after["2xx"] - before["2xx"]),
            "server_p99_ms": round(quantile(before["handler"], after["handler"], 0.99) * 1000, 3),
            "server_non_2xx": int(after["requests"] - before["requests"] - (after["2xx"] - before["2xx"])),
            "fallbacks": int(after["fallbacks"] - before["fallbacks"]),
            "mean_batch": round((after["batched"] - before["batched"]) / batches, 2) if batches else None}


def closed_level(target: Target, connections: int, duration_s: float, script: Path, bodies: Path,
                 threads: int = 1) -> dict[str, Any]:
    """One wrk run: its own figures, its CPU (rusage), the servers' CPU and the service's own histograms."""
    before = scrape(target.url) if target.kind == "service" else None
    cpu0 = target.cpu()
    proc = subprocess.Popen(["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s:g}s",
                             "--timeout", "10s", "-s", str(script), f"{target.url}/rerank", "--", str(bodies)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = (proc.stdout.read() if proc.stdout else b"").decode()
    server_cpu = target.cpu() - cpu0
    found = re.search(r"^WRK (\{.*\})$", out, re.M)
    if proc.returncode or not found:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-500:]} "
                           f"{(proc.stderr.read() if proc.stderr else b'').decode()[-500:]}")
    w = json.loads(found.group(1))
    wall = w["duration_us"] / 1e6
    pct = w["percentiles_us"]
    errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
    row = {"target": target.name, "connections": connections, "requests": w["requests"],
           "throughput_rps": round(w["requests"] / wall, 1), "ok_rps": round((w["requests"] - w["status"]) / wall, 1),
           "p50_ms": pct["50"] / 1000,
           "p90_ms": pct["90"] / 1000, "p99_ms": pct["99"] / 1000, "p99.9_ms": pct["99.9"] / 1000,
           "non_2xx": w["status"], "socket_errors": errors,
           "server_cpu_us_per_request": round(server_cpu / max(w["requests"], 1) * 1e6, 1),
           "server_cpu_s": round(server_cpu, 3), "wall_s": round(wall, 3),
           "server_cores_busy": round(server_cpu / wall, 2),
           "wrk_cores_busy": round((usage.ru_utime + usage.ru_stime) / wall, 3),
           **server_side(target, before)}
    if "answers" in row:  # model answers: 2xx that are not a fallback, per second of the level
        row["model_answers_rps"] = round((row["answers"] - row["fallbacks"]) / wall, 1)
    print(f"  {target.name:<11} c={connections:<3} {row['throughput_rps']:8.1f} req/s  client p50 "
          f"{row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms  server p99 {row.get('server_p99_ms', '-')}  "
          f"{row['server_cpu_us_per_request']:.0f} us CPU/req on {row['server_cores_busy']:.2f} cores, "
          f"wrk {row['wrk_cores_busy']:.2f}  non-2xx {row['non_2xx']} errors {errors} "
          f"batch {row.get('mean_batch', '-')}", flush=True)
    return row


def open_level(target: Target, rate: float, duration_s: float, models: Path) -> dict[str, Any]:
    """The fault suite's uvloop generator at a fixed rate (open loop, 64 connections, its own process)."""
    before = scrape(target.url) if target.kind == "service" else None
    cpu0 = target.cpu()
    records = Load(target.url, models, connections=64, rate=rate, duration_s=duration_s).stop(wait_s=duration_s + 30)
    server_cpu = target.cpu() - cpu0
    ok = [r.latency_s for r in records if r.status == 200]
    row = {"target": target.name, "offered_rps": round(rate, 1), "answered_rps": round(len(records) / duration_s, 1),
           "non_2xx": sum(r.status != 200 for r in records), "fallbacks": sum(r.fallback for r in records),
           **percentiles_ms(ok),
           "server_cpu_us_per_request": round(server_cpu / max(len(records), 1) * 1e6, 1),
           **server_side(target, before)}
    print(f"  {target.name:<11} open {rate:7.0f}/s: client p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f} ms, "
          f"server p99 {row.get('server_p99_ms', '-')}, non-2xx {row['non_2xx']}", flush=True)
    return row


# --------------------------------------------------------------------------------------------- summary


def best_under(levels: list[dict[str, Any]], p99_ms: float = P99_BUDGET_MS) -> dict[str, Any] | None:
    """The closed-loop level with the highest throughput, only 2xx answers and no socket error, whose p99 is
    within budget as the client saw it (and server side, where the server reports it)."""
    ok = [lv for lv in levels if max(lv["p99_ms"], lv.get("server_p99_ms", 0.0)) <= p99_ms
          and lv["non_2xx"] == 0 and lv["socket_errors"] == 0]
    return max(ok, key=lambda lv: lv["throughput_rps"]) if ok else None


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max over the repeats."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def summarise(repeats: list[dict[str, Any]], model: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Per repeat, then the spread: best throughput at p99 <= 10 ms per target, N-worker speed-up, CPU per
    request against its parts (ceiling + model at the mean batch the service ran), one-connection p50."""
    names = ["service x1", f"service x{workers}", "ceiling x1", f"ceiling x{workers}"]
    per: dict[str, list[float]] = {}
    b1 = next(r for r in model if r["batch"] == 1)

    def add(key: str, value: float | None) -> None:
        if value is not None:
            per.setdefault(key, []).append(value)

    for rep in repeats:
        by = {n: [lv for lv in rep["closed"] if lv["target"] == n] for n in names}
        best = {n: best_under(by[n]) for n in names}
        # 2xx answers only: a level where admission refused some (429) does not count its refusals as served
        peak = {n: peak_2xx(by[n]) for n in names}
        for n in names:
            add(f"rps {n}", best[n]["throughput_rps"] if best[n] else 0.0)
            add(f"peak rps {n}", peak[n])
        if best[names[0]] and best[names[1]]:
            add("speedup", best[names[1]]["throughput_rps"] / best[names[0]]["throughput_rps"])
        if peak[names[0]] and peak[names[2]]:  # at any latency: what the cores allow, beside the bare HTTP stack's
            add("peak speedup service", peak[names[1]] / peak[names[0]])
            add("peak speedup ceiling", peak[names[3]] / peak[names[2]])
        for n, ceiling in ((names[0], names[2]), (names[1], names[3])):
            b = best[n]
            if b is None or b.get("mean_batch") is None:
                continue
            ceil_level = next(lv for lv in by[ceiling] if lv["connections"] == b["connections"])
            parts = ceil_level["server_cpu_us_per_request"] + model_cpu_us_per_list(model, b["mean_batch"])
            add(f"cpu ratio {n}", b["server_cpu_us_per_request"] / parts)
            add(f"cpu us {n}", b["server_cpu_us_per_request"])
            add(f"cpu parts us {n}", parts)
            add(f"mean batch {n}", b["mean_batch"])
        c1 = {n: next((lv for lv in by[n] if lv["connections"] == 1), None) for n in names}
        if c1[names[0]] and c1[names[2]]:
            bound = c1[names[2]]["p50_ms"] + b1["ort"]["p50_ms"]
            add("c1 p50 service", c1[names[0]]["p50_ms"])
            add("c1 p50 ceiling", c1[names[2]]["p50_ms"])
            add("c1 bound", bound)
            add("c1 ratio", c1[names[0]]["p50_ms"] / bound)
    out = {k: spread(v) for k, v in per.items()}
    get = lambda k: out.get(k, {}).get("median", float("nan"))  # noqa: E731
    out["targets"] = {
        f"{workers} workers >= {TARGETS['workers_speedup']}x one worker's throughput at p99 <= 10 ms":
            get("speedup") >= TARGETS["workers_speedup"],
        f"service CPU/request <= {TARGETS['cpu_per_request_vs_parts']}x (ceiling + model at the mean batch), "
        f"{workers} workers": get(f"cpu ratio {names[1]}") <= TARGETS["cpu_per_request_vs_parts"],
        f"one-connection p50 <= {TARGETS['c1_p50_vs_bound']}x (ceiling p50 + model batch-1 p50)":
            get("c1 ratio") <= TARGETS["c1_p50_vs_bound"],
    }
    out["model_b1_p50_ms"] = b1["ort"]["p50_ms"]
    out.update(compare_ab(repeats, workers))
    return out


def compare_ab(repeats: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """With --compare: per worker count, the other checkout's (B) best throughput at p99 <= 10 ms and peak 2xx
    rate, and this checkout's (A) over B's, each per repeat, then the spread. Empty without B."""
    per: dict[str, list[float]] = {}
    for rep in repeats:
        for w in sorted({1, workers}):
            a = [lv for lv in rep["closed"] if lv["target"] == f"service x{w}"]
            b = [lv for lv in rep["closed"] if lv["target"] == f"service-B x{w}"]
            if not a or not b:
                continue
            best_a, best_b = best_under(a), best_under(b)
            peak_a, peak_b = peak_2xx(a), peak_2xx(b)
            per.setdefault(f"rps service-B x{w}", []).append(best_b["throughput_rps"] if best_b else 0.0)
            per.setdefault(f"peak rps service-B x{w}", []).append(peak_b)
            if best_a and best_b:
                per.setdefault(f"ab ratio x{w}", []).append(best_a["throughput_rps"] / best_b["throughput_rps"])
            if peak_b:
                per.setdefault(f"ab peak ratio x{w}", []).append(peak_a / peak_b)
    return {k: spread(v) for k, v in per.items()}


def admission(repeats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per service target and connection count, over the repeats: model answers/s, refusals (non-2xx, all 429 from
    admission here) per second and per answer, the door's 429 p99, the share of admitted requests the model answered
    inside the deadline, CPU per answer and per 429, the Little's-law wait at the target's peak, and the checks.

    CPU per 429 is estimated per level as (server CPU - answers x CPU per answer) / refusals, with CPU per answer
    from the same repeat's highest level of that target that refused under 1% of its answers."""
    rows: list[dict[str, Any]] = []
    names = sorted({lv["target"] for rep in repeats for lv in rep["closed"]
                    if lv["target"].startswith("service") and "model_answers_rps" in lv})
    for name in names:
        per_level: dict[int, list[dict[str, Any]]] = {}
        for rep in repeats:
            levels = [lv for lv in rep["closed"] if lv["target"] == name]
            clean = [lv for lv in levels if lv["non_2xx"] <= 0.01 * max(lv["answers"], 1) and lv["answers"]]
            ref = max(clean, key=lambda lv: lv["connections"]) if clean else None
            cpu_answer = ref["server_cpu_s"] / ref["answers"] if ref else None
            for lv in levels:
                cell = {"answers_rps": lv["model_answers_rps"], "refusals_rps": lv["non_2xx"] / lv["wall_s"],
                        "refusals_per_answer": lv["non_2xx"] / max(lv["answers"], 1),
                        "refusal_p99_ms": lv.get("refusal_p99_ms"),
                        "on_time": 1 - lv["fallbacks"] / lv["answers"] if lv["answers"] else None,
                        "cpu_us_per_answer": cpu_answer * 1e6 if cpu_answer else None, "cpu_us_per_refusal": None}
                if cpu_answer and lv["non_2xx"] > 0.1 * max(lv["requests"], 1):  # else noise over few refusals
                    cell["cpu_us_per_refusal"] = (lv["server_cpu_s"] - cpu_answer * lv["answers"]) / lv["non_2xx"] * 1e6
                per_level.setdefault(lv["connections"], []).append(cell)
        peak = max(statistics.median(c["answers_rps"] for c in cells) for cells in per_level.values())
        best_before: list[float] = []  # answers/s of the best earlier level, every repeat
        for conns in sorted(per_level):
            cells = per_level[conns]
            med = lambda key, cells=cells: _median_known([c[key] for c in cells])  # noqa: E731
            answers = [c["answers_rps"] for c in cells]
            wait_s = conns / peak if peak else float("inf")
            row = {"target": name, "connections": conns, "answers_rps": spread(answers),
                   "refusals_rps": med("refusals_rps"), "refusals_per_answer": med("refusals_per_answer"),
                   "refusal_p99_ms": med("refusal_p99_ms"), "on_time": med("on_time"),
                   "cpu_us_per_answer": med("cpu_us_per_answer"), "cpu_us_per_refusal": med("cpu_us_per_refusal"),
                   "little_wait_ms": round(wait_s * 1000, 1), "fits": wait_s <= DEADLINE_S}
            row["goodput_held"] = not best_before or max(answers) >= min(best_before)
            if row["fits"]:
                few = (row["refusals_per_answer"] or 0) <= ADMISSION["refusals_per_answer"]
                row["met"] = row["goodput_held"] and few
            else:
                fast = row["refusal_p99_ms"] is not None and row["refusal_p99_ms"] <= ADMISSION["refusal_p99_ms"]
                row["met"] = (row["goodput_held"] and fast and row["on_time"] is not None
                              and row["on_time"] >= ADMISSION["admitted_on_time"])
            if not best_before or statistics.median(answers) > statistics.median(best_before):
                best_before = answers
            rows.append(row)
    return rows


def _median_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def admission_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = ["## Admission under load", "",
             f"Per connection count, medians over the repeats (answers: median and range). Model answers: 2xx that "
             f"are not a fallback. Little's-law wait: connections / the target's peak model answers/s; where it "
             f"fits the {DEADLINE_S * 1000:g} ms deadline the target is refusals <= "
             f"{ADMISSION['refusals_per_answer']:.0%} of answers, where it does not, the door's 429 p99 <= "
             f"{ADMISSION['refusal_p99_ms']:g} ms (server side: time in the door plus the event-loop lag before it) "
             f"and >= {ADMISSION['admitted_on_time']:.0%} of admitted requests answered by the model in time; at every "
             "level, model answers/s no lower than the best earlier level's (within the repeats' range). CPU per 429 "
             "is an estimate, where refusals are over 10% of requests: the level's server CPU less its answers at "
             "the CPU per answer of the highest level that refused under 1%, over the refusals.", "",
             "| server | connections | model answers/s | 429/s | 429 per answer | door 429 p99 ms | admitted on time "
             "| CPU µs/answer | CPU µs/429 | Little's-law wait ms | met |", "|---" * 11 + "|"]
    for r in rows:
        a = r["answers_rps"]
        lines.append(f"| {r['target']} | {r['connections']} | {a['median']:,.0f} ({a['min']:,.0f} to {a['max']:,.0f}) "
                     f"| {fmt(r['refusals_rps'], '{:,.0f}')} | {fmt(r['refusals_per_answer'], '{:.3f}')} | "
                     f"{fmt(r['refusal_p99_ms'], '{:.2f}')} | {fmt(r['on_time'], '{:.4f}')} | "
                     f"{fmt(r['cpu_us_per_answer'], '{:,.0f}')} | {fmt(r['cpu_us_per_refusal'], '{:,.0f}')} | "
                     f"{r['little_wait_ms']:g} {'(fits)' if r['fits'] else '(over)'} | "
                     f"{'yes' if r['met'] else '**no**'} |")
    return [*lines, ""]


def peak_2xx(levels: list[dict[str, Any]]) -> float:
    """The highest rate of 2xx answers over the levels, at any latency."""
    return max((lv["throughput_rps"] * (1 - lv["non_2xx"] / max(lv["requests"], 1)) for lv in levels), default=0.0)


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    names = sorted({lv["target"] for rep in result["repeats"] for lv in rep["closed"]})
    for name in names:
        levels = sorted({lv["connections"] for rep in result["repeats"] for lv in rep["closed"]})
        rows = [[lv for rep in result["repeats"] for lv in rep["closed"]
                 if lv["target"] == name and lv["connections"] == c] for c in levels]
        x = [statistics.median(r["throughput_rps"] for r in rs) for rs in rows]
        y = [statistics.median(r["p99_ms"] for r in rs) for rs in rows]
        ax.plot(x, y, "o-" if name.startswith("service") else "s--", label=f"{name} (client p99)")
        for c, xi, yi in zip(levels, x, y, strict=True):
            ax.annotate(str(c), (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.axhline(P99_BUDGET_MS, color="k", lw=0.8, ls=":", label="p99 budget 10 ms")
    ax.set(xlabel="throughput (requests/s, median of repeats)", ylabel="p99 latency (ms, log)", yscale="log",
           title="wrk closed loop (labels: connections)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_report(result: dict[str, Any], out: Path, plotted: bool) -> None:
    m, s, n = result["machine"], result["summary"], result["workers"]
    sv = lambda k, f="{:.3f}": (  # noqa: E731
        f"{f.format(s[k]['median'])} ({f.format(s[k]['min'])} to {f.format(s[k]['max'])})" if k in s else "-")
    lines = [f"# Benchmark: the service with 1 and {n} workers, the HTTP ceiling and the model alone", "",
             f"Generated by `{result['command']}` (`make bench`) on {result['date']} in {result['wall_s']:.0f} s; "
             f"do not edit by hand. {result['repeats_n']} interleaved repeats; figures are the median over repeats "
             "with the range in brackets.", "", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += ["", "## Summary", "",
              f"Best closed-loop throughput with p99 <= {P99_BUDGET_MS:g} ms (client side, wrk; and server side for "
              "the service), only 2xx answers; and the peak rate of 2xx answers at any latency:", "",
             "| server | req/s at p99 <= 10 ms | peak req/s |", "|---|---|---|"]
    for name in ("service x1", f"service x{n}", "ceiling x1", f"ceiling x{n}"):
        lines.append(f"| {name} | {sv(f'rps {name}', '{:,.0f}')} | {sv(f'peak rps {name}', '{:,.0f}')} |")
    if "rps service-B x1" in s:
        for w in sorted({1, n}):
            lines.append(f"| service-B x{w} (`{result.get('compare', '?')}`) | "
                         f"{sv(f'rps service-B x{w}', '{:,.0f}')} | {sv(f'peak rps service-B x{w}', '{:,.0f}')} |")
        lines += ["", "A/B, this checkout's service over service-B's, per repeat then the spread: " + "; ".join(
            f"x{w}: {sv(f'ab ratio x{w}', '{:.2f}')}x at p99 <= 10 ms, {sv(f'ab peak ratio x{w}', '{:.2f}')}x at peak"
            for w in sorted({1, n}))
            + ". A range that holds 1.00 is no difference."]
    lines += ["", f"At peak, {n} workers serve {sv('peak speedup service', '{:.2f}')}x one worker's requests; "
              f"the bare HTTP stack with {n} processes serves {sv('peak speedup ceiling', '{:.2f}')}x one process's "
              "(wrk and the servers share the cores)."]
    t = s["targets"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    keys = list(t)
    lines += ["", "| target | measured | met |", "|---|---|---|",
              f"| {keys[0]} | {sv('speedup', '{:.2f}')}x | {yes(t[keys[0]])} |",
              f"| {keys[1]} | {sv(f'cpu ratio service x{n}', '{:.2f}')}x: {sv(f'cpu us service x{n}', '{:.0f}')} "
              f"µs against {sv(f'cpu parts us service x{n}', '{:.0f}')} µs at a mean batch of "
              f"{sv(f'mean batch service x{n}', '{:.1f}')} | {yes(t[keys[1]])} |",
              f"| {keys[2]} | {sv('c1 ratio', '{:.2f}')}x: {sv('c1 p50 service')} ms against "
              f"{sv('c1 bound')} ms (ceiling {sv('c1 p50 ceiling')} + model {s['model_b1_p50_ms']:.3f}) | "
              f"{yes(t[keys[2]])} |",
              "", f"With one worker: CPU/request {sv('cpu us service x1', '{:.0f}')} µs against its parts "
              f"{sv('cpu parts us service x1', '{:.0f}')} µs ({sv('cpu ratio service x1', '{:.2f}')}x).", ""]
    if plotted:
        lines += ["![throughput vs latency](benchmark.png)", ""]
    lines += admission_lines(result.get("admission", []))
    lines += ["## Model alone (one ONNX Runtime thread, in-process)", "",
              "| batch | wrapper p50 ms | wrapper p99 ms | wrapper CPU µs/list | ORT p50 ms | ORT CPU µs/list "
              "| wrapper lists/s |", "|---|---|---|---|---|---|---|"]
    for r in result["model"]:
        lines.append(f"| {r['batch']} | {r['rank']['p50_ms']:.3f} | {r['rank']['p99_ms']:.3f} | "
                     f"{r['rank_cpu_us_per_list']:.0f} | {r['ort']['p50_ms']:.3f} | {r['ort_cpu_us_per_list']:.0f} | "
                     f"{r['rank_lists_per_s']:,.0f} |")
    lines += ["", "## Closed loop (wrk), every repeat", "",
              "| repeat | server | connections | req/s | client p50 / p99 / p99.9 ms | server p50 / p99 ms | "
              "server CPU µs/req | server cores | wrk cores | mean batch | non-2xx | socket errors | fallbacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, rep in enumerate(result["repeats"], 1):
        for lv in rep["closed"]:
            server = (f"{lv['server_p50_ms']:.3f} / {lv['server_p99_ms']:.3f}" if "server_p50_ms" in lv else "-")
            lines.append(f"| {i} | {lv['target']} | {lv['connections']} | {lv['throughput_rps']:,.0f} | "
                         f"{lv['p50_ms']:.3f} / {lv['p99_ms']:.3f} / {lv['p99.9_ms']:.3f} | {server} | "
                         f"{lv['server_cpu_us_per_request']:.0f} | {lv['server_cores_busy']:.2f} | "
                         f"{lv['wrk_cores_busy']:.2f} | {lv.get('mean_batch') or '-'} | {lv['non_2xx']} | "
                         f"{lv['socket_errors']} | {lv.get('fallbacks', '-')} |")
    if any(rep["open"] for rep in result["repeats"]):
        lines += ["", "## Open loop (fixed offered rate), every repeat", "",
                  "| repeat | server | offered req/s | answered req/s | client p50 / p99 ms | server p50 / p99 ms | "
                  "server CPU µs/req | non-2xx | fallbacks |", "|---|---|---|---|---|---|---|---|---|"]
        for i, rep in enumerate(result["repeats"], 1):
            for lv in rep["open"]:
                server = (f"{lv['server_p50_ms']:.3f} / {lv['server_p99_ms']:.3f}" if "server_p50_ms" in lv else "-")
                lines.append(f"| {i} | {lv['target']} | {lv['offered_rps']:,.0f} | {lv['answered_rps']:,.0f} | "
                             f"{lv['p50_ms']:.3f} / {lv['p99_ms']:.3f} | {server} | "
                             f"{lv['server_cpu_us_per_request']:.0f} | {lv['non_2xx']} | {lv['fallbacks']} |")
    lines += ["", "## How it was measured", "",
              f"- Servers: `python -m service` with `RERANK_WORKERS` 1 and {n} (one ONNX Runtime session, batcher "
              "and event loop per worker; features from a loopback redis-server loaded with the snapshot); the HTTP "
              f"ceiling (`loadtest/servers.py ceiling`: read the body, parse it with the service's parser, answer "
              f"a fixed body) as 1 and {n} processes on one SO_REUSEPORT port, like the workers.",
              f"- Closed loop: `wrk -t1 -cC -d{result['duration_s']:g}s` with `loadtest/bench.py`'s Lua script "
              "cycling through the model's held-out requests; client latency is wrk's. wrk is one process on the "
              "same cores as the servers (its CPU is in the table), so every figure is a lower bound on what the "
              "server does with the machine to itself.",
              "- Open loop: `python -m loadtest.faults load` (uvloop, 64 connections) at fixed rates, fractions of "
              "the 1-worker service's best closed-loop throughput in the first repeat.",
              "- Server side: the service's own handler histogram (`rerank_request_duration_seconds`, summed over "
              "workers, interpolated within buckets) and mean batch (`rerank_batch_size`). CPU: user + system "
              "seconds of every server process from /proc over the level.",
              "- CPU target: the service's CPU per request at its best level against the ceiling's CPU per request "
              "at the same connection count and worker count, plus the model wrapper's CPU per list at the mean "
              "batch size the service ran (interpolated over the model-alone table).",
              "- One-connection bound: the ceiling's client p50 at one connection plus ONNX Runtime's batch-1 p50.",
              ""]
    (out / "benchmark.md").write_text("\n".join(lines))


def checkout_name(path: Path) -> str:
    """``path`` and its commit, for the report."""
    rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{path} @ {rev.stdout.strip()}" if rev.returncode == 0 else str(path)


def main() -> None:
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
    args = parser.parse_args()
    if args.replot:
        result = json.loads((args.out / "benchmark.json").read_text())
        result["summary"] = summarise(result["repeats"], result["model"], result["workers"])
        result["admission"] = admission(result["repeats"])
        (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
        write_report(result, args.out, plot(result, args.out / "benchmark.png"))
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    t0 = time.time()
    workers = args.workers or usable_cores()
    folder = find_version(args.models)
    levels = [int(x) for x in args.concurrency.split(",")]
    fractions = [float(x) for x in args.rates.split(",") if x]
    print(f"model {folder.name}; {workers} workers; wrk levels {levels}; {args.repeats} repeats", flush=True)
    model = model_only(folder, [int(x) for x in args.batch_sizes.split(",")], args.model_min_s)
    repeats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, redis(folder) as redis_url, contextlib.ExitStack() as stack:
        script, bodies = Path(tmp) / "bench.lua", Path(tmp) / "bodies.jsonl"
        script.write_text(WRK_SCRIPT)
        bodies.write_bytes(b"\n".join(load_bodies(folder)) + b"\n")
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
                for target in targets:
                    rep["closed"].append(closed_level(target, c, args.duration_s, script, bodies))
            if not rates:
                best = best_under([lv for lv in rep["closed"] if lv["target"] == "service x1"])
                rates = [f * best["throughput_rps"] for f in fractions] if best else []
            for rate in rates:
                for target in targets[:2]:
                    rep["open"].append(open_level(target, rate, args.duration_s, args.models))
            repeats.append(rep)
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("RERANK_"))
    result = {"command": " ".join([*([settings] if settings else []), "python -m loadtest.bench", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "model_version": folder.name, "workers": workers, "duration_s": args.duration_s,
              **({"compare": checkout_name(args.compare)} if args.compare is not None else {}),
              "repeats_n": args.repeats, "model": model, "repeats": repeats}
    result["summary"] = summarise(repeats, model, workers)
    result["admission"] = admission(repeats)
    result["wall_s"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    write_report(result, args.out, plot(result, args.out / "benchmark.png"))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}/benchmark.json and benchmark.md")


if __name__ == "__main__":
    main()

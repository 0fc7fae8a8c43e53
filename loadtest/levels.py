"""One load level against one target, measured from both ends: a wrk closed-loop run, or an open-loop run of the
load client; the client's figures, the servers' CPU, and the service's own histograms and counters over the level.

Owns: wrk's Lua script (held-out bodies in turn, a JSON summary line), the level's row, and picking the best level
under a latency budget. Does not know: which levels a benchmark runs or how it reports them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from loadtest import heldout
from loadtest.client import Load
from loadtest.measure import percentiles_ms
from loadtest.scrape import Scrape, quantile, scrape
from loadtest.targets import Target

P99_BUDGET_MS = 10.0
HANDLER = "rerank_request_duration_seconds"
REFUSAL = "rerank_refusal_duration_seconds"  # the admission door's 429s (services that export it)

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


def wrk_files(folder: Path, models: Path) -> tuple[Path, Path]:
    """wrk's script and the held-out bodies it cycles through, one per line, written into ``folder``."""
    script, bodies = folder / "bench.lua", folder / "bodies.jsonl"
    script.write_text(WRK_SCRIPT)
    bodies.write_bytes(b"\n".join(heldout.bodies(models)) + b"\n")
    return script, bodies


def server_side(target: Target, before: Scrape | None) -> dict[str, Any]:
    """The service's own figures over a level, from a scrape before it and one now (every worker summed)."""
    if before is None or target.kind != "service":
        return {}
    after = scrape(target.url)
    batches = after.total("rerank_batch_size_count") - before.total("rerank_batch_size_count")
    answers = after.total("rerank_requests_total", status="2xx") - before.total("rerank_requests_total", status="2xx")
    handler = before.histogram(HANDLER), after.histogram(HANDLER)
    refusal = before.histogram(REFUSAL), after.histogram(REFUSAL)
    refused = refusal[1] and refusal[1][float("inf")] - refusal[0].get(float("inf"), 0.0)
    batched = after.total("rerank_batch_size_sum") - before.total("rerank_batch_size_sum")
    return {"server_p50_ms": round(quantile(*handler, 0.5) * 1000, 3),
            "refusal_p99_ms": round(quantile(*refusal, 0.99) * 1000, 3) if refused else None,
            "answers": int(answers),
            "server_p99_ms": round(quantile(*handler, 0.99) * 1000, 3),
            "server_non_2xx": int(after.total("rerank_requests_total") - before.total("rerank_requests_total")
                                  - answers),
            "fallbacks": int(after.total("rerank_fallbacks_total") - before.total("rerank_fallbacks_total")),
            "mean_batch": round(batched / batches, 2) if batches else None}


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
    """The load client at a fixed rate (open loop, 64 connections, its own process)."""
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


def best_under(levels: list[dict[str, Any]], p99_ms: float = P99_BUDGET_MS) -> dict[str, Any] | None:
    """The closed-loop level with the highest throughput, only 2xx answers and no socket error, whose p99 is
    within budget as the client saw it (and server side, where the server reports it)."""
    ok = [lv for lv in levels if max(lv["p99_ms"], lv.get("server_p99_ms", 0.0)) <= p99_ms
          and lv["non_2xx"] == 0 and lv["socket_errors"] == 0]
    return max(ok, key=lambda lv: lv["throughput_rps"]) if ok else None


def peak_2xx(levels: list[dict[str, Any]]) -> float:
    """The highest rate of 2xx answers over the levels, at any latency."""
    return max((lv["throughput_rps"] * (1 - lv["non_2xx"] / max(lv["requests"], 1)) for lv in levels), default=0.0)

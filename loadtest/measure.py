"""Small measurement helpers the benchmarks share: the machine, timing a call, percentiles and the spread over
repeats. Owns no server and no report."""

from __future__ import annotations

import contextlib
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.config import usable_cores


def machine() -> dict[str, Any]:
    """CPU, cores this process may use, memory, OS, Python and the versions that matter here."""
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


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max over the repeats."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def median_known(values: list[float | None]) -> float | None:
    """The median of the values that are known; None when none is."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def timed(fn: Callable[[Any], Any], args: list[Any], min_s: float, min_calls: int = 30) -> tuple[list[float], float]:
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

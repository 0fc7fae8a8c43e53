"""One process against torchrun's data-parallel processes: validation and test N@6 per seed, and the time per epoch
(``python -m training ddp``, ``reports/ddp.md``).

Owns: launching ``python -m training fit`` alone (every core to its torch threads) and under
``torch.distributed.run`` (the cores shared out, one thread per process when there are as many processes as
cores), collecting their figures, and the report. Does not know: how training is split (``distributed.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def fit_command(procs: int, seed: int, variant: str, epochs: int, threads: int, json_path: Path) -> list[str]:
    base = ["-m", "training", "fit", "--variant", variant, "--seed", str(seed), "--epochs", str(epochs),
            "--threads", str(threads), "--json", str(json_path), "--no-progress"]
    if procs == 1:
        return [sys.executable, *base]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *base]


def run(procs: int, seeds: list[int], variant: str, epochs: int, out: Path, command: str) -> Path:
    cores = len(os.sched_getaffinity(0))
    rows: list[dict[str, Any]] = []
    # One process with every core, torchrun sharing them out, and one process with a torchrun process's share.
    modes = list(dict.fromkeys([(1, cores), (procs, max(1, cores // procs)), (1, max(1, cores // procs))]))
    for seed in seeds:
        for n, threads in modes:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                subprocess.run(fit_command(n, seed, variant, epochs, threads, Path(tmp.name)), check=True)
                rows.append(json.loads(Path(tmp.name).read_text()))
    doc = {"command": command, "procs": procs, "cores": cores, "runs": rows, "audit": default_audit()}
    return write(doc, out)


def default_audit() -> dict[str, float]:
    """Test N@6 of the rankings that learn nothing on the lists ``fit`` trains on (the defaults of every config)."""
    from training import audit, candidates, data, retriever

    dataset = data.prepare(data.load("ml100k"))
    lists = candidates.build_all_lists(dataset, retriever.fit_retrievers(dataset, retriever.RetrieverConfig()),
                                       candidates.ListConfig())
    result = audit.audit(lists, candidates.item_counts(dataset))
    return {**result.n6, "verdict": result.verdict}  # type: ignore[dict-item]


def write(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.json").write_text(json.dumps(doc, indent=2))
    path = out / "ddp.md"
    path.write_text(render(doc["runs"], doc["procs"], doc["cores"], doc["command"], doc["audit"]))
    return path


def replot(out: Path) -> Path:
    """The report again from ``out/ddp.json``, with the audit computed where the file lacks it."""
    doc = json.loads((out / "ddp.json").read_text())
    if isinstance(doc, list):  # the first format: the runs alone, from `python -m training ddp --procs 2`
        doc = {"command": "python -m training ddp --procs 2 --seeds 0,1,2", "procs": 2,
               "cores": len(os.sched_getaffinity(0)), "runs": doc}
    doc.setdefault("audit", default_audit())
    return write(doc, out)


def _summary(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows]
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def render(rows: list[dict[str, Any]], procs: int, cores: int, command: str, audit: dict[str, Any]) -> str:
    rankings = [k for k in audit if k != "verdict"]
    lines = ["# Data-parallel training: one process against torchrun", "",
             f"Produced by `{command}` on {cores} cores. Same lists, same seeds, same batch (each of the {procs} "
             "processes takes every n-th list of it and the gradients are averaged before each step), so both make "
             "the same number of steps per epoch.", "",
             f"Leakage audit of the lists (ML-100K, the default sampler): {audit['verdict']}. Test N@6 of the "
             "rankings that learn nothing on them, beside which the N@6 below counts:", "",
             "| " + " | ".join(rankings) + " |", "|---" * len(rankings) + "|",
             "| " + " | ".join(f"{audit[k]:.2f}" for k in rankings) + " |", "",
             "| processes x threads | seed | valid N@6 | test N@6 | best epoch | median s/epoch |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} x {r['threads']} | {r['seed']} | {r['valid_n6']:.2f} | {r['test_n6']:.2f} "
                     f"| {r['best_epoch']} | {statistics.median(r['epoch_seconds']):.1f} |")
    lines += ["", "| processes x threads | valid N@6 (mean ± std over seeds) | test N@6 | median s/epoch |",
              "|---|---|---|---|"]
    for mode in dict.fromkeys((r["processes"], r["threads"]) for r in rows):
        these = [r for r in rows if (r["processes"], r["threads"]) == mode]
        per_epoch = statistics.median(s for r in these for s in r["epoch_seconds"])
        lines.append(f"| {mode[0]} x {mode[1]} | {_summary(these, 'valid_n6')} | {_summary(these, 'test_n6')} "
                     f"| {per_epoch:.1f} |")
    return "\n".join(lines) + "\n"

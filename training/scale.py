"""How the offline pipeline's time and memory grow with the data: each pipeline stage's wall time and peak RSS on
the seeded synthetic log (``training/synthetic.py``) at several multiples of ML-100K's interactions.

    python -m training scale                             # 1x, 10x, 100x -> reports/scale.md, reports/scale.png
    python -m training scale --factors 1,10 --out-reports build/scale

Each size runs in a fresh process (so one size's peak never carries into the next) through the stages of
``python -m training pipeline --dataset table``: generate (write the Parquet table), prepare (read, k-core, slates),
retriever (pre-validation + out-of-fold MFs), lists (popularity negatives, scored by the MFs), audit, train (one
epoch of PRM on the first ``--train-lists`` training lists: the time per list is what scales) and export (ONNX,
parity on every test list, the user snapshot and held-out requests). A thread samples the process's RSS every
10 ms; a stage's peak is the highest sample while it ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
STAGES = ("generate", "prepare", "retriever", "lists", "audit", "train", "export")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Stages:
    """Wall time and peak RSS per stage, from a sampling thread."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.rows: list[dict[str, Any]] = []
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._peak = max(self._peak, rss_mib())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._peak = start = rss_mib()
        t0 = time.perf_counter()
        yield
        end = rss_mib()
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2), "rss_start_mib": round(start),
                          "rss_peak_mib": round(max(self._peak, end)), "rss_end_mib": round(end)})

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_one(factor: float, train_lists: int, mf_epochs: int, mf_folds: int, threads: int) -> dict[str, Any]:
    """Every stage at ``factor`` x ML-100K in this process; the figures."""
    import torch

    from training import audit, candidates, data, export, retriever, synthetic, train

    torch.set_num_threads(threads)
    size = synthetic.Size.times(factor)
    stages = Stages()
    floor = rss_mib()  # the interpreter, numpy, pandas and torch, before any data
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with stages.stage("generate"):
            ratings, users, items = synthetic.generate(size)
            ratings.to_parquet(folder / "ratings.parquet", index=False)
            users.to_csv(folder / "users.csv", index=False)
            items.to_csv(folder / "items.csv", index=False)
            del ratings, users, items
        with stages.stage("prepare"):
            dataset = data.prepare(data.load_table(folder / "ratings.parquet", folder / "users.csv",
                                                   folder / "items.csv"))
        with stages.stage("retriever"):
            retr = retriever.fit_retrievers(dataset, retriever.RetrieverConfig(epochs=mf_epochs, folds=mf_folds))
        with stages.stage("lists"):
            lists = candidates.build_all_lists(dataset, retr, candidates.ListConfig())
        with stages.stage("audit"):
            result = audit.audit(lists, candidates.item_counts(dataset), draws=5)
        cfg = train.TrainConfig(variant="prm", epochs=1, patience=1, threads=threads)
        few = {"train": lists["train"].subset(slice(0, train_lists)), "valid": lists["valid"].subset(slice(0, 2000)),
               "test": lists["test"]}
        with stages.stage("train"):
            fitted = train.train(dataset, few, cfg, progress=False)
        with stages.stage("export"):
            export.export(fitted.model, dataset, lists, folder / "models", "scale", {}, {"test": {}})
    stages.close()
    return {"factor": factor, "users": len(dataset.user_ids), "items": len(dataset.item_ids),
            "interactions": dataset.n_interactions, "lists": {s: len(cl) for s, cl in lists.items()},
            "trained_lists": len(few["train"]), "audit_valid": result.valid,
            "mf_dense_mib": round((1 + mf_folds) * len(dataset.user_ids) * dataset.n_items * 4 / 2**20),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "floor_mib": round(floor),
            "stages": stages.rows, "config": {"mf_epochs": mf_epochs, "mf_folds": mf_folds, "threads": threads,
                                              "generated": dataclasses.asdict(size)}}


def run(factors: list[float], out: Path, train_lists: int, mf_epochs: int, mf_folds: int, threads: int,
        command: str, on_result: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Each factor in its own ``python -m training scale --one`` process; the report's path."""
    results = []
    out.mkdir(parents=True, exist_ok=True)
    for factor in factors:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            subprocess.run([sys.executable, "-m", "training", "scale", "--one", str(factor), "--json", tmp.name,
                            "--train-lists", str(train_lists), "--mf-epochs", str(mf_epochs),
                            "--mf-folds", str(mf_folds), "--threads", str(threads)], check=True)
            results.append(json.loads(Path(tmp.name).read_text()))
        if on_result is not None:
            on_result(results[-1])
        results[-1]["command"] = command
        (out / "scale.json").write_text(json.dumps(results, indent=2))
        write_report(results, out, command)
    return out / "scale.md"


def data_peak(r: dict[str, Any]) -> float:
    """The run's peak RSS above its floor (the process with its libraries imported, before any data)."""
    return max(s["rss_peak_mib"] for s in r["stages"]) - r["floor_mib"]


def linear_check(results: list[dict[str, Any]]) -> list[str]:
    """Peak RSS above the floor against interactions, from the smallest size to each larger one."""
    base = results[0]
    lines = []
    for r in results[1:]:
        grow = r["interactions"] / base["interactions"]
        peak = data_peak(r) / max(data_peak(base), 1.0)
        lines.append(f"- {r['factor']:g}x: interactions x{grow:.1f}, peak RSS above the floor x{peak:.1f} "
                     f"({'at most linear' if peak <= grow else 'MORE THAN LINEAR'})")
    return lines


def write_report(results: list[dict[str, Any]], out: Path, command: str) -> Path:
    cfg = results[0]["config"]
    lines = ["# The offline pipeline at scale", "",
             f"Produced by `{command}` on the seeded synthetic log (`training/synthetic.py`), each size in its own "
             f"process. MF retrievers at {cfg['mf_epochs']} epochs and {cfg['mf_folds']} folds (the pipeline's "
             f"default is 30 and 5: their time grows with epochs x folds, their memory does not); train = one PRM "
             "epoch on the first training lists ("
             + ", ".join(f"{r['factor']:g}x: {r['trained_lists']:,}" for r in results)
             + f"); {cfg['threads']} torch threads.", "",
             "| size | users | items | interactions | lists (train/valid/test) | dense MF scores (old code, "
             "computed) | peak RSS (all stages) | of which data (above the floor) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["lists"]
        lines.append(f"| {r['factor']:g}x | {r['users']:,} | {r['items']:,} | {r['interactions']:,} | "
                     f"{n['train']:,} / {n['valid']:,} / {n['test']:,} | {r['mf_dense_mib']:,} MiB | "
                     f"{max(s['rss_peak_mib'] for s in r['stages']):,} MiB | {data_peak(r):,.0f} MiB |")
    lines += ["", "Wall seconds and peak RSS (MiB) per stage:", "",
              "| stage | " + " | ".join(f"{r['factor']:g}x s | {r['factor']:g}x peak" for r in results) + " |",
              "|---" * (1 + 2 * len(results)) + "|"]
    for name in STAGES:
        cells = []
        for r in results:
            s = next(x for x in r["stages"] if x["stage"] == name)
            cells += [f"{s['seconds']:.1f}", f"{s['rss_peak_mib']:,}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS above the floor (the process with its libraries imported, "
              f"{results[0]['floor_mib']} MiB at {results[0]['factor']:g}x) against interactions:", "",
              *linear_check(results), "",
              "\"dense MF scores\" is what the retrievers held before this version ((1 + folds) float32 users x items "
              "matrices, all at once): arithmetic, not measured. Scores are now computed from the MF factors a block "
              "of users at a time (`retriever.MFScores`, at most 64 MiB of scores per MF).", "",
              "![peak RSS per stage](scale.png)"]
    path = out / "scale.md"
    path.write_text("\n".join(lines) + "\n")
    plot(results, out / "scale.png")
    return path


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.array([r["interactions"] for r in results], dtype=float)
    for name in STAGES:
        ax.plot(x, [max(next(s for s in r["stages"] if s["stage"] == name)["rss_peak_mib"] - r["floor_mib"], 1)
                    for r in results], marker="o", label=name)
    ax.plot(x, x / x[0] * data_peak(results[0]), "k:", label="linear from the smallest run's peak")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("interactions")
    ax.set_ylabel("peak RSS during the stage, above the floor (MiB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(out: Path) -> Path:
    """The report and plot again from ``out/scale.json`` (the command stays the one that measured)."""
    results = json.loads((out / "scale.json").read_text())
    return write_report(results, out, results[0].get("command", "python -m training scale"))


def main_one(factor: float, json_path: Path, train_lists: int, mf_epochs: int, mf_folds: int, threads: int) -> None:
    json_path.write_text(json.dumps(run_one(factor, train_lists, mf_epochs, mf_folds, threads)))

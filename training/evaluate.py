"""Train and evaluate named variants over seeds; write the Markdown report and the CSVs.

Owns: the variant x seed loop, aggregation (mean, sample std), ``reports/<dataset>.{md,csv}`` and the
per-run ``reports/<dataset>_runs.csv``. Does not know: how a variant trains (``train.py``) or exports.
"""

from __future__ import annotations

import csv
import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training import metrics
from training.data import Dataset, stats_table
from training.retriever import CandidateLists
from training.train import VARIANTS, TrainConfig, TrainResult, predict, train

RETRIEVER = "retriever"  # the retriever's own order, no reranking


@dataclass
class Run:
    variant: str
    seed: int
    test: dict[str, float]
    valid: dict[str, float]
    best_epoch: int = 0
    seconds_per_epoch: float = 0.0
    wall_seconds: float = 0.0
    result: TrainResult | None = None  # the trained model, kept for export


def run_variants(dataset: Dataset, lists: dict[str, CandidateLists], variants: list[str], seeds: list[int],
                 base: TrainConfig, progress: bool = True) -> list[Run]:
    """Every variant at every seed; ``retriever`` is deterministic given the lists, so it runs once."""
    unknown = [v for v in variants if v != RETRIEVER and v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected {RETRIEVER} or one of {sorted(VARIANTS)}")
    test, valid = lists["test"], lists["valid"]
    runs: list[Run] = []
    for variant in variants:
        if variant == RETRIEVER:
            runs.append(Run(variant, 0, metrics.evaluate(test.scores, test.labels, test.mask),
                            metrics.evaluate(valid.scores, valid.labels, valid.mask)))
            continue
        for seed in seeds:
            t0 = time.perf_counter()
            result = train(dataset, lists, dataclasses.replace(base, variant=variant, seed=seed), progress)
            test_metrics = metrics.evaluate(predict(result.model, test), test.labels, test.mask)
            runs.append(Run(variant, seed, test_metrics, result.best_valid, result.best_epoch,
                            result.seconds_per_epoch, time.perf_counter() - t0, result))
            if progress:
                print(f"  {variant:<11} seed {seed}: test N@6 {test_metrics['N@6']:.2f}, valid N@6 "
                      f"{result.best_valid['N@6']:.2f} (epoch {result.best_epoch}), "
                      f"{result.seconds_per_epoch:.1f} s/epoch", flush=True)
    return runs


def summarise(runs: list[Run], split: str = "test") -> list[dict[str, object]]:
    """Rows (variant, metric, mean, std, n_seeds); std is the sample std (ddof=1), 0 for one seed."""
    rows: list[dict[str, object]] = []
    for variant in dict.fromkeys(r.variant for r in runs):
        these = [getattr(r, split) for r in runs if r.variant == variant]
        for metric in metrics.METRICS:
            values = np.array([m[metric] for m in these])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            rows.append({"variant": variant, "metric": metric, "mean": round(float(values.mean()), 4),
                         "std": round(std, 4), "n_seeds": len(values)})
    return rows


def best_variant(runs: list[Run]) -> str:
    """The trained variant with the highest mean validation N@6 (never chosen on test)."""
    means = {v: np.mean([r.valid["N@6"] for r in runs if r.variant == v])
             for v in dict.fromkeys(r.variant for r in runs if r.result is not None)}
    return max(means, key=lambda v: means[v])


def _table(rows: list[dict[str, object]]) -> list[str]:
    lines = ["| variant | " + " | ".join(metrics.METRICS) + " | seeds |",
             "|---" * (len(metrics.METRICS) + 2) + "|"]
    for variant in dict.fromkeys(str(r["variant"]) for r in rows):
        cells = {str(r["metric"]): r for r in rows if r["variant"] == variant}
        n = cells[metrics.METRICS[0]]["n_seeds"]
        values = [f"{cells[m]['mean']:.2f} ± {cells[m]['std']:.2f}" for m in metrics.METRICS]
        lines.append(f"| {variant} | " + " | ".join(values) + f" | {n} |")
    return lines


def write_report(out_dir: Path, dataset: Dataset, runs: list[Run], info: dict[str, object]) -> Path:
    """Write ``<name>.md``, ``<name>.csv`` (test summary) and ``<name>_runs.csv`` (every run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = dataset.name
    test_rows = summarise(runs, "test")
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        summary = csv.DictWriter(f, fieldnames=["variant", "metric", "mean", "std", "n_seeds"])
        summary.writeheader()
        summary.writerows(test_rows)
    with open(out_dir / f"{name}_runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "split", "metric", "value", "best_epoch", "seconds_per_epoch"])
        for r in runs:
            for split in ("valid", "test"):
                for metric, value in getattr(r, split).items():
                    writer.writerow([r.variant, r.seed, split, metric, round(value, 4), r.best_epoch,
                                     round(r.seconds_per_epoch, 3)])

    timing = ["| variant | seconds / epoch | best epoch (mean) | wall seconds / run |", "|---|---|---|---|"]
    for variant in dict.fromkeys(r.variant for r in runs if r.result is not None):
        these = [r for r in runs if r.variant == variant]
        per_epoch, best, wall = (np.mean([getattr(r, a) for r in these])
                                 for a in ("seconds_per_epoch", "best_epoch", "wall_seconds"))
        timing.append(f"| {variant} | {per_epoch:.2f} | {best:.1f} | {wall:.0f} |")
    lines = [
        f"# {name}: PRM baselines on the retriever's candidate lists",
        "",
        f"Generated by `{info.get('command', 'python -m training pipeline')}` on {time.strftime('%Y-%m-%d')}; "
        f"do not edit by hand. Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}.",
        "",
        "## Data",
        "",
        stats_table(dataset),
        "",
        "## Retriever",
        "",
        f"- Held-out AUC (validation and test slate items against every item the user never rated): "
        f"{info.get('retriever_heldout_auc', float('nan')):.4f}",
        f"- List AUC with labels z on train lists: {info.get('retriever_train_list_auc', float('nan')):.2f}; "
        f"on test lists: {info.get('retriever_test_list_auc', float('nan')):.2f}. The retriever saw the train "
        "slates, not the test ones, so its order is a much weaker (here inverted) signal at test time: the "
        "train/test score shift DNR is meant to denoise.",
        "",
        "## Test metrics (%, mean ± sample std over seeds)",
        "",
        *_table(test_rows),
        "",
        "## Validation metrics (%, best epoch by validation N@6)",
        "",
        *_table(summarise(runs, "valid")),
        "",
        "## Training time",
        "",
        *timing,
        "",
        f"Best variant on validation N@6: **{info.get('best_variant', best_variant(runs))}**. "
        f"Data, retriever, training and evaluation wall time: {info.get('wall_seconds', float('nan')):.0f} s "
        "(the export follows).",
        "",
        "## Settings",
        "",
        "```",
        *(f"{k}: {v}" for k, v in info.items() if k not in {"command"}),
        "```",
        "",
    ]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    return path

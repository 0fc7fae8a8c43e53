"""What the saved run files say, worked out once: the findings the offline report renders.

Owns: reading ``<dataset>_{runs,epochs,lists,noise}.csv``, ``_audit.json``, ``_regimes.csv``,
``_regime_lists.csv`` and ``_info.json`` into ``RunFiles``; the pure analysis on them (summaries over seeds,
significance tests, epoch times, the controlled regimes, stalled runs, the best baseline and pathway) and the
``Findings`` object that holds every figure the report prints. Does not know: markdown or plots (``report.py``),
or how the runs were produced (``evaluate.py``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from training import evaluate, metrics
from training.evaluate import BASELINES, PATHWAY_VARIANTS, RETRIEVER
from training.train import VARIANTS, TrainConfig

Rows = list[dict[str, str]]
CONTROLLED = "controlled"  # the name prefix of the semi-synthetic regimes


def read_csv(path: Path) -> Rows:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass(frozen=True)
class RunFiles:
    """The files a pipeline saved, as read: CSV rows and the two JSON documents."""

    runs: Rows
    epochs: Rows
    per_list: Rows
    noise: Rows
    regimes: Rows
    regime_lists: Rows
    audit: dict[str, Any]
    info: dict[str, Any]

    @classmethod
    def read(cls, out_dir: Path, name: str) -> RunFiles:
        def table(suffix: str) -> Rows:
            return read_csv(out_dir / f"{name}_{suffix}.csv")

        return cls(runs=table("runs"), epochs=table("epochs"), per_list=table("lists"), noise=table("noise"),
                   regimes=table("regimes"), regime_lists=table("regime_lists"),
                   audit=json.loads((out_dir / f"{name}_audit.json").read_text()),
                   info=json.loads((out_dir / f"{name}_info.json").read_text()))


def values(runs: Rows, variant: str, split: str, metric: str) -> dict[int, float]:
    """Seed -> value of one variant's metric on one split."""
    return {int(r["seed"]): float(r["value"]) for r in runs
            if r["variant"] == variant and r["split"] == split and r["metric"] == metric}


def variants_of(rows: Rows) -> list[str]:
    return list(dict.fromkeys(r["variant"] for r in rows))


def summarise(runs: Rows, split: str = "test") -> list[dict[str, Any]]:
    """Rows (variant, metric, mean, std, n_seeds); std is the sample std (ddof=1), 0 for one seed."""
    rows: list[dict[str, Any]] = []
    for variant in variants_of(runs):
        for metric in metrics.METRICS:
            xs = np.array(list(values(runs, variant, split, metric).values()))
            std = float(xs.std(ddof=1)) if len(xs) > 1 else 0.0
            rows.append({"variant": variant, "metric": metric, "mean": round(float(xs.mean()), 4),
                         "std": round(std, 4), "n_seeds": len(xs)})
    return rows


def significance(runs: Rows, per_list: Rows, variant: str, against: str) -> dict[str, float]:
    """Test N@6 of ``variant`` minus ``against``: paired t-test over seeds (same seed, both variants) and a
    Wilcoxon signed-rank test over test lists (each list's N@6 averaged over seeds); two-sided p-values.

    Against the retriever order (one deterministic run) every seed of ``variant`` is paired with that run, so
    the t-test is a one-sample test of the seeds' differences."""
    a, b = values(runs, variant, "test", "N@6"), values(runs, against, "test", "N@6")
    if against == RETRIEVER and len(b) == 1:
        b = dict.fromkeys(a, next(iter(b.values())))
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    t_p = float(stats.ttest_rel(x, y).pvalue) if len(seeds) > 1 and np.any(x != y) else float("nan")
    la = np.array([float(r[variant]) for r in per_list])
    lb = np.array([float(r[against]) for r in per_list])
    w_p = float(stats.wilcoxon(la, lb).pvalue) if np.any(la != lb) else float("nan")
    diffs = x - y
    return {"diff": float(diffs.mean()), "std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
            "seeds": len(seeds), "wins": int((x > y).sum()), "t_p": t_p, "lists": len(la),
            "list_wins": int((la > lb).sum()), "list_losses": int((la < lb).sum()), "wilcoxon_p": w_p}


def epoch_seconds(epochs: Rows, variant: str, after: int = 0) -> float:
    """Median training seconds per epoch of ``variant`` over its seeds' epochs after epoch ``after``. The
    median, not the mean: an epoch that shared the CPU with something else should not move the figure."""
    xs = [float(r["seconds"]) for r in epochs if r["variant"] == variant and int(r["epoch"]) > after]
    return float(np.median(xs)) if xs else float("nan")


def switch_epoch(reranker: dict[str, Any]) -> int:
    """The last heuristic epoch of the settings that ran (``TrainConfig.switch_epoch``)."""
    return TrainConfig(epochs=int(reranker.get("epochs", 0)), lambda_e=float(reranker.get("lambda_e", 0))).switch_epoch


def mean_at(rows: Rows, key: str, pick: str, switch: int = 0) -> float:
    """Mean over seeds of ``key`` at each seed's first epoch, its last heuristic epoch (``switch``) or its last."""
    by_seed: dict[str, Rows] = {}
    for r in rows:
        if r.get(key):
            by_seed.setdefault(r["seed"], []).append(r)
    picked = []
    for seq in by_seed.values():
        if pick == "first":
            picked.append(seq[0])
        elif pick == "switch":
            picked += [r for r in seq if int(r["epoch"]) == switch]
        else:
            picked.append(seq[-1])
    return float(np.mean([float(r[key]) for r in picked])) if picked else float("nan")


def controlled_rows(regimes: Rows, regime_lists: Rows, audit: dict[str, Any]) -> list[dict[str, Any]]:
    """Per controlled regime and DNR variant: the training and test lists' list AUC (%) and DNR's test N@6 minus
    PRM's and minus the best score pathway's there (paired by seed), with the spread and the two tests."""
    out = []
    for regime in dict.fromkeys(r["sampler"] for r in regimes if r["sampler"].startswith(CONTROLLED)):
        runs = [r for r in regimes if r["sampler"] == regime]
        per_list = [r for r in regime_lists if r["sampler"] == regime]
        ran = variants_of(runs)
        pathway = next((v for v in ran if v in PATHWAY_VARIANTS), None)
        aucs = audit["samplers"].get(regime, {}).get("list_auc", {})
        for v in (v for v in ran if v in VARIANTS and VARIANTS[v].synthetic):
            row: dict[str, Any] = {"regime": regime, "variant": v, "auc_train": aucs.get("train", float("nan")),
                                   "auc_test": aucs.get("test", float("nan"))}
            for key, against in (("prm", "prm"), ("pathway", pathway)):
                if against is not None and against in ran:
                    row[key] = {"against": against, **significance(runs, per_list, v, against)}
            out.append(row)
    return out


def stalled(runs: Rows) -> list[str]:
    """Runs that never learned: best epoch 0 or 1, or validation N@6 not above the retriever order's."""
    retriever = values(runs, RETRIEVER, "valid", "N@6").get(0)
    flagged = []
    for r in runs:
        if r["variant"] == RETRIEVER or r["split"] != "valid" or r["metric"] != "N@6":
            continue
        epoch, value = int(r["best_epoch"]), float(r["value"])
        if epoch <= 1 or (retriever is not None and value <= retriever):
            flagged.append(f"{r['variant']} seed {r['seed']} (best epoch {epoch}, valid N@6 {value:.2f})")
    return flagged


def significance_pairs(variants: list[str], best_pathway: str | None) -> list[tuple[str, str]]:
    """Every learned variant against the retriever order, then each synthetic variant against PRM and the best
    score pathway."""
    learned = [v for v in variants if v != RETRIEVER]
    challengers = [v for v in variants if v in VARIANTS and VARIANTS[v].synthetic]
    pairs = [(v, RETRIEVER) for v in learned if RETRIEVER in variants]
    pairs += [(v, against) for against in dict.fromkeys(b for b in ("prm", best_pathway) if b in learned)
              for v in challengers]
    return pairs


@dataclass(frozen=True)
class Findings:
    """Every figure and choice the report prints, worked out from ``RunFiles`` by ``find``."""

    files: RunFiles
    lambda_e: int  # the last heuristic epoch
    default: str  # the default sampler
    bar: tuple[str, float]  # the best non-learned ranking under the default sampler and its test N@6
    test_rows: list[dict[str, Any]]
    valid_rows: list[dict[str, Any]]
    valid_n6: dict[str, float]  # mean validation N@6 of each trained variant
    best: str
    best_base: str | None
    best_pathway: str | None
    shipped: str
    shipped_because: str
    challengers: list[str]  # the synthetic-score variants
    curve_variants: list[str]
    significance: list[tuple[str, str, dict[str, float]]]  # (variant, against, test)
    controlled: list[dict[str, Any]]
    stalled: list[str]

    @property
    def default_audit(self) -> dict[str, Any]:
        return dict(self.files.audit["samplers"][self.default])

    @property
    def reranker(self) -> dict[str, Any]:
        return dict(self.files.info.get("reranker", {}))


def find(files: RunFiles) -> Findings:
    """The findings of one pipeline's saved files."""
    runs, info, audit = files.runs, files.info, files.audit
    default = audit["default"]
    n6 = audit["samplers"][default]["n6"]
    bar_name = max(n6, key=lambda r: n6[r])
    variants = variants_of(runs)
    valid_n6 = {v: float(np.mean(list(values(runs, v, "valid", "N@6").values()))) for v in variants
                if v != RETRIEVER}
    best_base = evaluate.best_of(valid_n6, BASELINES)
    best_pathway = evaluate.best_of(valid_n6, PATHWAY_VARIANTS)
    best = info.get("best_variant") or evaluate.best_of(valid_n6) or ""
    challengers = [v for v in variants if v in VARIANTS and VARIANTS[v].synthetic]
    return Findings(
        files=files, lambda_e=switch_epoch(info.get("reranker", {})), default=default,
        bar=(bar_name, float(n6[bar_name])),
        test_rows=summarise(runs, "test"), valid_rows=summarise(runs, "valid"), valid_n6=valid_n6, best=best,
        best_base=best_base, best_pathway=best_pathway, shipped=info.get("shipped_variant", best),
        shipped_because=info.get("shipped_because", "the best variant on validation N@6"), challengers=challengers,
        curve_variants=[v for v in variants if v in ("prm", "prm-concat", best_base) or evaluate.is_dnr(v)],
        significance=[(v, a, significance(runs, files.per_list, v, a))
                      for v, a in significance_pairs(variants, best_pathway)],
        controlled=controlled_rows(files.regimes, files.regime_lists, audit), stalled=stalled(runs))

"""Train and evaluate named variants over seeds, under each candidate-list regime; save every figure.

Owns: which runs a pipeline asks for (variants x seeds, and which variants the regimes table runs); the run
files the report reads: ``reports/<dataset>_{runs,epochs,lists,scores}.csv``, ``_audit.json`` (the leakage
audit of every sampler), ``_regimes.csv`` and ``_regime_lists.csv`` (the key variants under each sampler) and
``_info.json``; ``_noise.csv`` holds the true and synthetic noise densities.
Does not know: how a variant trains (``train.py``), where runs execute and are cached (``runner.py``), how
lists are built (``candidates.py``), how the report reads (``report.py``) or exports.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from training import metrics
from training.audit import Audit
from training.candidates import CandidateLists
from training.data import Dataset, stats_table
from training.runner import Run, Runner
from training.train import VARIANTS, TrainConfig

RETRIEVER = "retriever"  # the retriever's own order, no reranking
BASELINES = ("prm", "prm-concat", "prm-add", "prm-weight", "prm-residual", "prm-late")
PATHWAY_VARIANTS = BASELINES[1:]  # the baselines that read the retriever score (model.PATHWAYS are their kinds)
NOISE_BINS = 80
# Per-epoch figures saved beside validation N@6: the losses, and the list AUC of x' (and of the real x) against z.
EPOCH_KEYS = ["L_direct", "L_z", "L_adv", "L_x", "xprime_auc", "x_auc"]
RUN_COLUMNS = ["variant", "seed", "split", "metric", "value", "best_epoch", "seconds_per_epoch", "wall_seconds"]


def check_variants(variants: list[str]) -> None:
    """Refuse unknown variant names (before anything trains)."""
    unknown = [v for v in variants if v != RETRIEVER and v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected {RETRIEVER} or one of {sorted(VARIANTS)}")


def retriever_run(lists: dict[str, CandidateLists]) -> Run:
    """The retriever's own order, deterministic given the lists."""
    test, valid = lists["test"], lists["valid"]
    return Run(RETRIEVER, 0, metrics.evaluate(test.scores, test.labels, test.mask),
               metrics.evaluate(valid.scores, valid.labels, valid.mask),
               test_n6=metrics.ndcg_at_k(test.scores, test.labels, mask=test.mask))


def run_variants(runner: Runner, sampler: str, variants: list[str], seeds: list[int], base: TrainConfig
                 ) -> list[Run]:
    """Every variant at every seed on ``sampler``'s lists; ``retriever`` is deterministic, so it runs once."""
    check_variants(variants)
    cfgs = [dataclasses.replace(base, variant=v, seed=s) for v in variants if v != RETRIEVER for s in seeds]
    trained = iter(runner.run(sampler, cfgs))
    runs: list[Run] = []
    for variant in variants:
        if variant == RETRIEVER:
            runs.append(retriever_run(runner.lists_of[sampler]))
        else:
            runs.extend(next(trained) for _ in seeds)
    return runs


def valid_means(runs: list[Run]) -> dict[str, float]:
    """Mean validation N@6 over seeds of each trained variant, in run order."""
    return {v: float(np.mean([r.valid["N@6"] for r in runs if r.variant == v]))
            for v in dict.fromkeys(r.variant for r in runs if r.variant != RETRIEVER)}


def best_of(means: dict[str, float], among: Iterable[str] | None = None) -> str | None:
    """The variant with the highest mean validation N@6 in ``means``, among ``among`` if given (run order breaks
    ties); None when none of them ran. The report calls it on the saved runs, the pipeline on its own."""
    names = [v for v in means if among is None or v in among]
    return max(names, key=lambda v: means[v]) if names else None


def is_dnr(variant: str) -> bool:
    """A DNR variant: synthetic scores from a model-based generator."""
    return variant in VARIANTS and VARIANTS[variant].generator


def best_variant(runs: list[Run]) -> str:
    """The trained variant with the highest mean validation N@6 (never chosen on test)."""
    best = best_of(valid_means(runs))
    if best is None:
        raise ValueError("no trained variant ran")
    return best


SHIP_P = 0.05  # a DNR variant ships only if it beats the best baseline on validation with a paired t-test p below it


def shipped_variant(runs: list[Run]) -> tuple[str, str]:
    """(the variant to export, why). The best variant on validation N@6 ships, unless it is a DNR variant that is
    not ahead of the best baseline (PRM or a score pathway) on validation by a paired t-test over seeds at
    ``SHIP_P``: then the baseline ships, since a DNR model costs more to train and explain, and a margin inside
    the seed-to-seed noise is no evidence that it ranks better. Never chosen on test."""
    best = best_variant(runs)
    if best not in VARIANTS or not VARIANTS[best].synthetic:
        return best, "the best variant on validation N@6"
    base = best_of(valid_means(runs), BASELINES)
    if base is None:
        return best, "the best variant on validation N@6 (no baseline ran)"
    valid = {v: {r.seed: r.valid["N@6"] for r in runs if r.variant == v} for v in (best, base)}
    seeds = sorted(set(valid[best]) & set(valid[base]))
    diffs = np.array([valid[best][s] - valid[base][s] for s in seeds])
    p = float(stats.ttest_rel([valid[best][s] for s in seeds], [valid[base][s] for s in seeds]).pvalue) \
        if len(seeds) > 1 and np.any(diffs != 0) else float("nan")
    if diffs.mean() > 0 and p < SHIP_P:
        return best, (f"the best variant on validation N@6, ahead of {base} by {diffs.mean():+.2f} "
                      f"(paired t-test over {len(seeds)} seeds p {p:.3g})")
    return base, (f"the best baseline on validation N@6: the best variant, {best}, is ahead of it by only "
                  f"{diffs.mean():+.2f} on validation (paired t-test over {len(seeds)} seeds p {p:.3g}, not below "
                  f"{SHIP_P}), which is no evidence that it ranks better")


def best_pathway(runs: list[Run]) -> str | None:
    """The score-pathway baseline with the highest mean validation N@6, if any ran."""
    return best_of(valid_means(runs), PATHWAY_VARIANTS)


def best_dnr(runs: list[Run]) -> str | None:
    """The DNR variant (a model-based generator) with the highest mean validation N@6, if any ran."""
    means = valid_means(runs)
    return best_of(means, [v for v in means if is_dnr(v)])


def regime_variants(runs: list[Run]) -> list[str]:
    """What the regimes tables run: the retriever order, PRM, the best score pathway and the best DNR variant on
    validation (from the main table), each only if the main table ran it."""
    ran = {r.variant for r in runs}
    wanted = [RETRIEVER, "prm", best_pathway(runs), best_dnr(runs)]
    return [v for v in dict.fromkeys(wanted) if v is not None and v in ran]


def regime_count(variants: list[str]) -> int:
    """How many trained variants ``regime_variants`` will pick, known before anything trains."""
    return ("prm" in variants) + any(v in PATHWAY_VARIANTS for v in variants) + any(is_dnr(v) for v in variants)


def _run_rows(runs: list[Run]) -> list[list[object]]:
    return [[r.variant, r.seed, split, metric, round(value, 4), r.best_epoch, round(r.seconds_per_epoch, 3),
             round(r.wall_seconds, 1)]
            for r in runs for split in ("valid", "test") for metric, value in getattr(r, split).items()]


def _list_rows(runs: list[Run]) -> list[list[object]]:
    """Per test list: its index, then each variant's N@6 averaged over seeds."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    per_variant = {v: np.mean([r.test_n6 for r in runs if r.variant == v], axis=0) for v in variants}
    n = len(next(iter(per_variant.values()))) if per_variant else 0
    return [[i, *(round(float(per_variant[v][i]), 5) for v in variants)] for i in range(n)]


def save_audits(out_dir: Path, name: str, audits: dict[str, Audit], default: str) -> None:
    """``<name>_audit.json``: per sampler, the non-learned rankings' test N@6, list AUCs and the verdict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"default": default, "samplers": {
        sampler: {"n6": a.n6, "list_auc": a.list_auc, "tolerance": a.tolerance, "valid": a.valid,
                  "verdict": a.verdict, "reasons": a.reasons, "lists": len(a.per_list["random"])}
        for sampler, a in audits.items()}}
    (out_dir / f"{name}_audit.json").write_text(json.dumps(doc, indent=1))


def save_regimes(out_dir: Path, name: str, regimes: dict[str, list[Run]]) -> None:
    """``<name>_regimes.csv`` (the runs columns with the sampler first) and ``<name>_regime_lists.csv`` (per
    sampler and test list, each variant's N@6 averaged over seeds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}_regimes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sampler", *RUN_COLUMNS])
        writer.writerows([sampler, *row] for sampler, runs in regimes.items() for row in _run_rows(runs))
    variants = list(dict.fromkeys(r.variant for runs in regimes.values() for r in runs))
    with open(out_dir / f"{name}_regime_lists.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sampler", "list", *variants])
        for sampler, runs in regimes.items():
            ran = list(dict.fromkeys(r.variant for r in runs))
            for row in _list_rows(runs):
                values = dict(zip(ran, row[1:], strict=True))
                writer.writerow([sampler, row[0], *(values.get(v, "") for v in variants)])


def save_runs(out_dir: Path, dataset: Dataset, lists: dict[str, CandidateLists], runs: list[Run],
              info: dict[str, Any]) -> None:
    """Everything the report needs, as plain files: per run, per epoch, per test list, score histograms."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = dataset.name
    with open(out_dir / f"{name}_runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RUN_COLUMNS)
        writer.writerows(_run_rows(runs))
    with open(out_dir / f"{name}_epochs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "epoch", "seconds", *EPOCH_KEYS, "valid_N@6"])
        for r in runs:
            for e in r.result.epochs if r.result is not None else []:
                writer.writerow([r.variant, r.seed, int(e["epoch"]), round(e["seconds"], 3),
                                 *(round(e[k], 5) if k in e else "" for k in EPOCH_KEYS), round(e["valid_N@6"], 4)])
    # Per test list, N@6 averaged over seeds: the unit of the per-list paired test.
    with open(out_dir / f"{name}_lists.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["list", *dict.fromkeys(r.variant for r in runs)])
        writer.writerows(_list_rows(runs))
    # Noise distributions (the paper's Figure 5): the true noise x - z of the real scores on the validation lists,
    # and the synthetic noise x' - z of the first seed of each synthetic variant as its last noise made it there.
    valid = lists["valid"]
    samples = {"true noise x - z": (valid.scores - valid.labels)[valid.mask]}
    for r in runs:
        res = r.result
        if res is not None and res.synthetic is not None and res.synthetic_z is not None and \
                f"{r.variant} x' - z" not in samples:
            samples[f"{r.variant} x' - z"] = res.synthetic - res.synthetic_z
    edges = np.linspace(-1.0, 1.0, NOISE_BINS + 1)
    with open(out_dir / f"{name}_noise.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "bin_low", "bin_high", "density"])
        for source, values in samples.items():
            density, _ = np.histogram(np.clip(values, -1.0, 1.0), bins=edges, density=True)
            writer.writerows([source, round(lo, 4), round(hi, 4), round(float(d), 5)]
                             for lo, hi, d in zip(edges[:-1], edges[1:], density, strict=True))
    info = {**info, "stats_table": stats_table(dataset), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__}
    (out_dir / f"{name}_info.json").write_text(json.dumps(info, indent=1, default=str))


# ---- the choices the paper leaves open, compared on validation ------------------------------------------

# Name -> TrainConfig overrides, each a one-knob change from the defaults (the first row). The early score
# pathway (concat) is left out: on PRM it costs 2.1 validation points (reports/ml100k.md, ablation) and on DNR
# twice the encoder passes.
CHOICES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "L_x on the marginal (the paper's)": {"lx_conditional": False},
    "L_x estimator w1": {"lx_estimator": "w1"},
    "Gaussian sigma 0.25": {"noise_sigma": 0.25},
    "no generator warm-up on L_x": {"gen_warmup": False},
    "generator on z and noise only": {"gen_condition": False},
    "generator lr 1e-2": {"gen_lr": 1e-2},
    "generator step every 2nd batch": {"gen_every": 2},
    "generator from 20% of the epochs (lambda_e 0.2)": {"lambda_e": 0.2},
    "lambda_m 0.2": {"lambda_m": 0.2},
    "lambda_m 1.0": {"lambda_m": 1.0},
}
REFERENCE = "prm"  # trained on the same seeds, so each choice can be read against the model DNR must beat


def compare_choices(runner: Runner, sampler: str, variant: str, seeds: list[int], base: TrainConfig,
                    choices: dict[str, dict[str, Any]], reference: str | None = REFERENCE) -> list[dict[str, Any]]:
    """Train ``variant`` under each choice and seed (and ``reference`` on the same seeds); one row each with the
    mean and std over seeds of validation (and, for reference, test) N@6, the per-seed validation values, the
    best epochs, and the mean paired difference against the first choice (the defaults) seed by seed."""
    named = [(name, overrides, variant) for name, overrides in choices.items()]
    if reference is not None:
        named.append((f"reference: {reference}", {}, reference))
    cfgs = [dataclasses.replace(base, **overrides, variant=v, seed=seed) for _, overrides, v in named for seed in seeds]
    runs = iter(runner.run(sampler, cfgs))  # every choice at once, so a pool keeps all its workers busy
    rows: list[dict[str, Any]] = []
    for name, overrides, v in named:
        done = [next(runs) for _ in seeds]
        valid = [r.valid["N@6"] for r in done]
        rows.append({"choice": name, "variant": v, "overrides": overrides, "seeds": len(done), "valid": valid,
                     "valid_N@6": float(np.mean(valid)), "valid_std": float(np.std(valid)),
                     "test_N@6": float(np.mean([r.test["N@6"] for r in done])),
                     "best_epochs": [r.best_epoch for r in done],
                     "seconds_per_epoch": float(np.mean([r.seconds_per_epoch for r in done]))})
    defaults = rows[0]["valid"]
    for row in rows:
        diffs = np.subtract(row["valid"], defaults)
        row["delta_valid"] = float(diffs.mean())
        row["delta_std"] = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
        row["wins"] = int((diffs > 0).sum())
    return rows

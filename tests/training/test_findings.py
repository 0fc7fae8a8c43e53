"""The report's analysis (findings.py) and its rendering (report.py) on hand-made run files: every figure the
report prints comes from a pure function of the saved rows, and every setting it names from the run's config."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from training import findings, metrics, report
from training.train import TrainConfig

VALID_TEST = dict[str, list[tuple[float, float]]]  # variant -> per seed (valid N@6, test N@6)


def run_rows(values: VALID_TEST, best_epoch: dict[str, int] | None = None) -> findings.Rows:
    rows = []
    for variant, seeds in values.items():
        for seed, pair in enumerate(seeds):
            for split, n6 in zip(("valid", "test"), pair, strict=True):
                rows += [{"variant": variant, "seed": str(seed), "split": split, "metric": m,
                          "value": str(n6 if m == "N@6" else 50.0),
                          "best_epoch": str((best_epoch or {}).get(variant, 5))} for m in metrics.METRICS]
    return rows


def list_rows(better: int, worse: int, variants: tuple[str, str]) -> findings.Rows:
    """Per test list, ``variants[0]``'s N@6 above the other's on ``better`` lists and below on ``worse``."""
    a, b = variants
    return ([{"list": str(i), a: "0.6", b: "0.4"} for i in range(better)]
            + [{"list": str(better + i), a: "0.4", b: "0.5"} for i in range(worse)])


def files(runs: findings.Rows, per_list: findings.Rows, reranker: dict[str, Any] | None = None) -> findings.RunFiles:
    audit = {"default": "popularity", "samplers": {"popularity": {
        "n6": {"random": 20.0, "retriever": 30.0, "reversed": 12.0, "popularity": 33.0, "memorisation": 21.0},
        "list_auc": {"train": 70.0, "valid": 71.0, "test": 70.5}, "valid": True, "reasons": [], "lists": 40}}}
    cfg = dataclasses.asdict(TrainConfig())
    info = {"data": {"dataset": "ml100k"}, "lists": {"candidates": 50}, "retriever": {"folds": 5},
            "reranker": {k: v for k, v in cfg.items() if k not in ("variant", "seed")} | (reranker or {}),
            "shipped_variant": "prm-late", "shipped_because": "the best baseline"}
    return findings.RunFiles(runs=runs, epochs=[], per_list=per_list, noise=[], regimes=[], regime_lists=[],
                             audit=audit, info=info)


SEEDS: VALID_TEST = {
    "retriever": [(30.0, 31.0)],
    "prm": [(40.0, 40.0), (41.0, 41.0), (39.0, 39.5), (40.5, 40.0), (40.0, 40.2)],
    "prm-late": [(42.0, 41.0), (42.5, 42.0), (41.0, 40.5), (42.0, 41.5), (41.5, 41.0)],
    "dnr-g": [(43.0, 42.0), (43.5, 43.5), (42.0, 41.0), (43.0, 42.7), (42.5, 42.0)],
}


def test_significance_pairs_seeds_and_lists() -> None:
    runs = run_rows(SEEDS)
    s = findings.significance(runs, list_rows(30, 5, ("dnr-g", "prm")), "dnr-g", "prm")
    assert s["seeds"] == 5 and s["wins"] == 5
    assert s["diff"] == pytest.approx((2.0 + 2.5 + 1.5 + 2.7 + 1.8) / 5)
    assert s["t_p"] < 0.05 and s["std"] > 0
    assert (s["lists"], s["list_wins"], s["list_losses"]) == (35, 30, 5) and s["wilcoxon_p"] < 0.05
    # Against the one deterministic retriever run, every seed is paired with it.
    r = findings.significance(runs, list_rows(3, 3, ("prm", "retriever")), "prm", "retriever")
    assert r["seeds"] == 5 and r["diff"] == pytest.approx(40.14 - 31.0)


def test_summarise_gives_the_sample_std_over_seeds() -> None:
    rows = findings.summarise(run_rows({"a": [(0.0, 1.0), (0.0, 3.0)], "b": [(0.0, 2.0)]}))
    n6 = {r["variant"]: r for r in rows if r["metric"] == "N@6"}
    assert (n6["a"]["mean"], n6["a"]["std"], n6["a"]["n_seeds"]) == (2.0, pytest.approx(1.4142, abs=1e-4), 2)
    assert (n6["b"]["std"], n6["b"]["n_seeds"]) == (0.0, 1)


def test_find_picks_the_bar_the_best_baseline_and_pathway_on_validation_and_the_pairs() -> None:
    runs = run_rows(SEEDS | {"prm-add": [(30.0, 50.0)]}, best_epoch={"prm-add": 1})
    per_list = [{"list": "0", **dict.fromkeys(SEEDS, "0.5"), "prm-add": "0.5"}]
    f = findings.find(files(runs, per_list))
    assert f.bar == ("popularity", 33.0)
    assert f.best_base == "prm-late" and f.best_pathway == "prm-late"  # prm-add leads on test, not validation
    assert f.best == "dnr-g" and f.shipped == "prm-late"
    assert [(v, a) for v, a, _ in f.significance] == [
        ("prm", "retriever"), ("prm-late", "retriever"), ("dnr-g", "retriever"), ("prm-add", "retriever"),
        ("dnr-g", "prm"), ("dnr-g", "prm-late")]
    assert f.stalled == ["prm-add seed 0 (best epoch 1, valid N@6 30.00)"]
    assert f.challengers == ["dnr-g"] and f.lambda_e == TrainConfig().switch_epoch


def test_deviations_name_the_settings_that_ran() -> None:
    runs = run_rows(SEEDS)
    per_list = [{"list": "0", **dict.fromkeys(SEEDS, "0.5")}]
    ran = {"batch_size": 128, "epochs": 30, "lambda_e": 0.2, "gen_every": 2, "lx_conditional": False,
           "dnr_pathway": "concat", "noise_sigma": 0.25}
    text = report.render(findings.find(files(runs, per_list, ran)), "toy")
    deviations = text.split("## Deviations from the paper")[1].split("## Settings")[0]
    assert "batch 128 lists" in deviations and "at most 30 epochs, of which the first 6 (lambda_e 0.2 of 30)" \
        in deviations
    assert "after every 2 reranker steps a generator step" in deviations and "(`gen_every` 2)" in deviations
    assert "on the marginal, as the paper" in deviations and "N(0.5, 0.25^2)" in deviations
    assert "DNR's pathway is `concat`" in deviations and "enters before the candidate encoder" in deviations
    default = report.render(findings.find(files(runs, per_list)), "toy")
    assert "batch 64 lists" in default and "after each reranker step" in default and "per label" in default


def test_every_section_is_rendered_once_in_order() -> None:
    runs = run_rows(SEEDS)
    per_list = [{"list": "0", **dict.fromkeys(SEEDS, "0.5")}]
    text = report.render(findings.find(files(runs, per_list)), "toy")
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[0] == "## Leakage audit" and heads[-1] == "## Settings" and len(heads) == len(set(heads))
    assert "| dnr-g | prm-late | +" in text  # the significance row of DNR against the best pathway

"""The one CLI: a tiny full pipeline writes the report, the CSVs and a model; bad files exit 2 with the name."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.training.fixtures import Tiny
from training import evaluate
from training.__main__ import main


@pytest.mark.slow
def test_pipeline_writes_report_csv_and_model(tmp_path: Path, synthetic_files: tuple[Path, Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ratings, users, items = synthetic_files
    code = main(["pipeline", "--dataset", "table", "--path", str(ratings), "--users", str(users), "--items",
                 str(items), "--core", "10", "--history-len", "6", "--candidates", "20", "--variants",
                 "retriever,prm,prm-add,prm-concat,g,dnr-b", "--seeds", "2", "--epochs", "2", "--lambda-e", "1",
                 "--patience", "1", "--hidden", "16", "--batch-size", "64",
                 "--mf-epochs", "2", "--mf-dim", "8", "--mf-folds", "2", "--sampler", "uniform",
                 "--regime-samplers", "uniform,retrieved", "--regime-seeds", "1",
                 "--controlled-aucs", "0.8", "--controlled-seeds", "2",
                 "--run-cache", "", "--out-reports", str(tmp_path / "reports"),
                 "--out-models", str(tmp_path / "models"), "--version", "cli-v1", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| users |" in out and "exported" in out
    assert "leakage audit, sampler uniform:" in out and "leakage audit, sampler retrieved:" in out
    with open(tmp_path / "reports" / "ratings.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"retriever", "prm", "prm-add", "prm-concat", "g", "dnr-b"}
    assert {r["n_seeds"] for r in rows if r["variant"] == "prm"} == {"2"}
    assert {r["metric"] for r in rows} == {"H@6", "N@6", "M@6", "F1@6", "AUC"}
    reports = tmp_path / "reports"
    report = (reports / "ratings.md").read_text()
    assert "| prm-add |" in report and "s / epoch" in report and "## Deviations from the paper" in report
    # Significance rows: each DNR variant against prm and against the score pathway best on validation.
    best_pathway = report.split("best score pathway: **")[1].split("**")[0]
    assert best_pathway in {"prm-add", "prm-concat"}
    assert all(f"| {v} | {against} |" in report for v in ("g", "dnr-b") for against in ("prm", best_pathway))
    assert "## What PRM learns from" in report and "| prm-add | reads the score (add) |" in report
    assert "| prm-concat | " in report and " 76.73 |" in report  # the paper's ML-1M N@6 beside ours
    # The audit comes first; the main table measures every variant against the best non-learned ranking.
    assert next(line for line in report.splitlines() if line.startswith("## ")) == "## Leakage audit"
    assert "| **uniform** (default) |" in report and "| retrieved |" in report
    assert re.search(r"\| N@6 − \w+ order \(\d+\.\d\d\) \|", report)
    # The regimes table: the key variants (retriever, prm, the best pathway, dnr-b) under both samplers, with
    # dnr-b against prm and the pathway under each.
    audit = json.loads((reports / "ratings_audit.json").read_text())
    controlled = "controlled AUC 0.80 (sigma 1)"
    assert audit["default"] == "uniform"
    assert set(audit["samplers"]) == {"uniform", "retrieved", "paper protocol", controlled}
    # The semi-synthetic regime hits its target list AUC on the training lists.
    assert abs(audit["samplers"][controlled]["list_auc"]["train"] - 80.0) < 2.0
    with open(reports / "ratings_regimes.csv") as f:
        regimes = list(csv.DictReader(f))
    assert {r["sampler"] for r in regimes} == {"uniform", "retrieved", "paper protocol", controlled}
    assert {r["seed"] for r in regimes if r["sampler"] == controlled} == {"0", "1"}
    assert "leakage audit, paper protocol:" in out
    assert f"| {controlled} | dnr-b | " in report and "(semi-synthetic)" in report
    with open(reports / "ratings_runs.csv") as f:
        main_valid = [r for r in csv.DictReader(f) if r["split"] == "valid" and r["metric"] == "N@6"]
    pathway = max(("prm-add", "prm-concat"), key=lambda v: sum(float(r["value"]) for r in main_valid
                                                                 if r["variant"] == v))
    for sampler in ("uniform", "retrieved", "paper protocol", controlled):
        assert {r["variant"] for r in regimes if r["sampler"] == sampler} == {"retriever", "prm", pathway, "dnr-b"}
        assert f"| {sampler} | dnr-b | prm |" in report and f"| {sampler} | dnr-b | {pathway} |" in report
        assert f"| {sampler} | prm | retriever |" in report
    # Every learned variant against the order it is handed, each seed paired with the one retriever run.
    assert "| prm | retriever |" in report and "| dnr-b | retriever | " in report
    assert re.search(r"\| g \| retriever \| [+-]\d+\.\d\d \| \d/2 \|", report)
    for plot in ("ratings_valid_n6.png", "ratings_noise.png", "ratings_dnr.png", "ratings_controlled.png"):
        assert (reports / plot).read_bytes()[:4] == b"\x89PNG"
    with open(reports / "ratings_noise.csv") as f:
        sources = {r["source"] for r in csv.DictReader(f)}
    assert sources == {"true noise x - z", "g x' - z", "dnr-b x' - z"}
    with open(reports / "ratings_epochs.csv") as f:
        epochs = [r for r in csv.DictReader(f) if r["variant"] == "dnr-b"]
    assert epochs and all(r["L_adv"] and r["L_x"] for r in epochs if int(r["epoch"]) > 1)
    # The diagnostics: x' against z beside the real x, every epoch, and the section that reads them.
    assert all(r["xprime_auc"] and r["x_auc"] for r in epochs)
    assert "## DNR diagnostics" in report and "| dnr-b | " in report.split("## DNR diagnostics")[1]
    assert "Runs that did not learn" in report
    manifest = json.loads((tmp_path / "models" / "cli-v1" / "manifest.json").read_text())
    with open(reports / "ratings_runs.csv") as f:
        runs = [r for r in csv.DictReader(f) if r["split"] == "valid" and r["metric"] == "N@6"]
    valid = {v: sum(float(r["value"]) for r in runs if r["variant"] == v)
             for v in ("prm", "prm-add", "prm-concat", "g", "dnr-b")}
    info = json.loads((reports / "ratings_info.json").read_text())
    assert info["best_variant"] == max(valid, key=lambda v: valid[v])
    assert manifest["config"]["reranker"]["variant"] == info["shipped_variant"]
    assert f"Ships (the exported default, what `make model` builds): **{info['shipped_variant']}**" in report
    assert manifest["max_candidates"] == 20

    # The report is redrawn from the saved run files alone, identically.
    (reports / "ratings.md").unlink()
    assert main(["report", "--name", "ratings", "--out-reports", str(reports)]) == 0
    assert (reports / "ratings.md").read_text() == report
    assert main(["report", "--name", "missing", "--out-reports", str(reports)]) == 2
    assert "missing_runs.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_pipeline_resumes_from_the_run_cache(tmp_path: Path,
                                                           synthetic_files: tuple[Path, Path, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pipeline", "--dataset", "table", "--path", str(synthetic_files[0]), "--core", "10", "--history-len",
            "6", "--candidates", "20", "--variants", "retriever,prm", "--seeds", "2", "--epochs", "1",
            "--hidden", "16", "--batch-size", "64", "--mf-epochs", "2", "--mf-dim", "8", "--mf-folds", "2",
            "--regime-samplers", "", "--no-paper-protocol", "--controlled-aucs", "", "--run-cache",
            str(tmp_path / "runs"), "--out-reports",
            str(tmp_path / "reports"), "--no-export", "--no-progress"]
    assert main(args) == 0

    def figures() -> list[tuple[str, ...]]:  # every metric of every run, without its timings
        with open(tmp_path / "reports" / "ratings_runs.csv") as f:
            return [(r["variant"], r["seed"], r["split"], r["metric"], r["value"]) for r in csv.DictReader(f)]

    runs = figures()
    assert len(list((tmp_path / "runs").rglob("*.pt"))) == 2
    next(iter((tmp_path / "runs").rglob("prm-seed1-*.pt"))).unlink()  # as if killed during seed 1
    capsys.readouterr()
    assert main([*args, "--progress"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: test N@6" in out and "(cached)" in out and out.count("(cached)") == 1
    assert figures() == runs  # the same figures, one run read back and one trained again
    report = (tmp_path / "reports" / "ratings.md").read_text()
    assert "training 1 runs and reusing 1 from the run cache" in report


def test_bad_file_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ratings.csv"
    bad.write_text("user,item\n1,2\n")
    assert main(["stats", "--dataset", "table", "--path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "missing column(s)" in err


def test_unknown_variant_exits_2(synthetic_files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    code = main(["pipeline", "--dataset", "table", "--path", str(synthetic_files[0]), "--core", "10",
                 "--variants", "prm-magic", "--mf-epochs", "1", "--run-cache", "", "--out-reports", str(tmp_path)])
    assert code == 2
    assert "unknown variant(s) ['prm-magic']" in capsys.readouterr().err


@pytest.mark.slow
def test_choices_compares_the_open_knobs_on_validation(tmp_path: Path, synthetic_files: tuple[Path, Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ratings, users, items = synthetic_files
    code = main(["choices", "--dataset", "table", "--path", str(ratings), "--users", str(users), "--items",
                 str(items), "--core", "10", "--history-len", "6", "--candidates", "20", "--variant", "dnr-g",
                 "--epochs", "2", "--lambda-e", "1", "--patience", "1", "--hidden", "16", "--batch-size", "64",
                 "--mf-epochs", "2", "--mf-dim", "8", "--mf-folds", "2", "--out-reports", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    table = (tmp_path / "ratings_choices.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # One row per choice and one for PRM on the same seeds; the pick is among the DNR rows only.
    assert len(rows) == len(evaluate.CHOICES) + 1 == 12 and sum("(best on validation)" in r for r in rows) == 1
    assert rows[-1].startswith(f"| reference: {evaluate.REFERENCE} | - | 1 |")
    assert "(best on validation)" not in rows[-1]
    assert "| L_x estimator w1 | lx_estimator=w1 | 1 |" in table
    # The defaults against themselves: a zero paired difference and no win.
    assert rows[0].split(" | ")[4:6] == ["+0.00 ± 0.00", "0/1"]
    assert main(["choices", "--variant", "prm", "--out-reports", str(tmp_path)]) == 2
    assert "is not one of the DNR variants" in capsys.readouterr().err


def test_make_model_builds_the_variant_the_report_picked_on_validation() -> None:
    root = Path(__file__).resolve().parents[2]
    report = (root / "reports" / "ml100k.md").read_text()
    best = re.search(r"Ships \(the exported default, what `make model` builds\): \*\*([\w-]+)\*\*", report)
    assert best, "the report lost its marker"
    assert json.loads((root / "reports" / "ml100k_info.json").read_text())["shipped_variant"] == best.group(1)
    # make model reads the variant from the committed report's run files (a dry run shows the command).
    dry = subprocess.run(["make", "-s", "-n", "model"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert f"--variants {best.group(1)} " in dry and f"--version ml100k-{best.group(1)}-default" in dry


@pytest.mark.slow
def test_pipeline_trains_audits_and_exports_from_a_candidate_log(tmp_path: Path, tiny: Tiny,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from training import candidate_log

    log, users, items = tmp_path / "candidates.parquet", tmp_path / "users.csv", tmp_path / "items.csv"
    candidate_log.write_log(tiny.dataset, tiny.lists, log)
    candidate_log.write_sides(tiny.dataset, users, items)
    renamed = tmp_path / "renamed.parquet"
    pd.read_parquet(log).rename(columns={"user_id": "uid", "label": "clicked"}).to_parquet(renamed)
    code = main(["pipeline", "--dataset", "log", "--path", str(renamed), "--users", str(users), "--items", str(items),
                 "--columns", "uid=user_id,clicked=label", "--history-len", str(tiny.dataset.history_len),
                 "--variants", "retriever,prm-late,g", "--seeds", "1", "--epochs", "2", "--patience", "1",
                 "--hidden", "16", "--batch-size", "64", "--controlled-aucs", "0.55,0.95", "--controlled-sigma", "30",
                 "--controlled-seeds", "1",
                 "--run-cache", str(tmp_path / "runs"), "--out-reports", str(tmp_path / "reports"),
                 "--out-models", str(tmp_path / "models"), "--version", "log-v1", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "leakage audit, logged:" in out and "logged retriever: list AUC" in out and "exported" in out
    assert "controlled AUC 0.95 (sigma 30): skipped" in out  # out of reach: said, not fatal
    audit = json.loads((tmp_path / "reports" / "renamed_audit.json").read_text())
    assert audit["default"] == "logged" and set(audit["samplers"]) == {"logged", "controlled AUC 0.55 (sigma 30)"}
    report = (tmp_path / "reports" / "renamed.md").read_text()
    assert "| **logged** (default) |" in report and "| prm-late |" in report
    manifest = json.loads((tmp_path / "models" / "log-v1" / "manifest.json").read_text())
    assert manifest["config"]["lists"]["sampler"] == "logged"

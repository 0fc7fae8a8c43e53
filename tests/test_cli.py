"""The one CLI: a tiny full pipeline writes the report, the CSVs and a model; bad files exit 2 with the name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.__main__ import main


def test_pipeline_writes_report_csv_and_model(tmp_path: Path, synthetic_files: tuple[Path, Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ratings, users, items = synthetic_files
    code = main(["pipeline", "--dataset", "table", "--path", str(ratings), "--users", str(users), "--items",
                 str(items), "--core", "10", "--history-len", "6", "--candidates", "20", "--variants",
                 "retriever,prm,prm-add", "--seeds", "2", "--epochs", "2", "--hidden", "16", "--batch-size", "64",
                 "--mf-epochs", "2", "--mf-dim", "8", "--out-reports", str(tmp_path / "reports"),
                 "--out-models", str(tmp_path / "models"), "--version", "cli-v1", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| users |" in out and "exported" in out
    with open(tmp_path / "reports" / "ratings.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"retriever", "prm", "prm-add"}
    assert {r["n_seeds"] for r in rows if r["variant"] == "prm"} == {"2"}
    assert {r["metric"] for r in rows} == {"H@6", "N@6", "M@6", "F1@6", "AUC"}
    report = (tmp_path / "reports" / "ratings.md").read_text()
    assert "| prm-add |" in report and "seconds / epoch" in report
    manifest = json.loads((tmp_path / "models" / "cli-v1" / "manifest.json").read_text())
    assert manifest["config"]["reranker"]["variant"] in {"prm", "prm-add"}
    assert manifest["max_candidates"] == 20


def test_bad_file_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ratings.csv"
    bad.write_text("user,item\n1,2\n")
    assert main(["stats", "--dataset", "table", "--path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "missing column(s)" in err


def test_unknown_variant_exits_2(synthetic_files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    code = main(["pipeline", "--dataset", "table", "--path", str(synthetic_files[0]), "--core", "10",
                 "--variants", "prm-magic", "--mf-epochs", "1", "--out-reports", str(tmp_path)])
    assert code == 2
    assert "unknown variant(s) ['prm-magic']" in capsys.readouterr().err

"""The candidate-log path checked against the built-in one: ML-100K's lists written as a candidate log, read back,
audited and trained on, beside the same lists as the pipeline builds them (``python -m training log-roundtrip``,
``reports/log_roundtrip.md``).

Owns: the comparison (arrays field by field, the audit's rankings, one variant's N@6 at one seed) and its report.
Does not know: how the lists are built or read (``candidates.py``, ``candidate_log.py``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import audit, candidate_log, candidates, data, retriever, runner
from training.candidates import CandidateLists
from training.train import TrainConfig

SPLITS = ("train", "valid", "test")


@dataclass
class Side:
    """One path's lists, audit and trained run."""

    name: str
    lists: dict[str, CandidateLists]
    audit: audit.Audit
    run: runner.Run | None = None


def differences(a: dict[str, CandidateLists], b: dict[str, CandidateLists]) -> dict[str, list[str]]:
    """Per split, the list fields whose arrays differ (shape or any value)."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        fields = [f.name for f in dataclasses.fields(CandidateLists)]
        out[split] = [f for f in fields if getattr(a[split], f).shape != getattr(b[split], f).shape
                      or not np.array_equal(getattr(a[split], f), getattr(b[split], f))]
    return out


def compare(dataset: data.Dataset, lists: dict[str, CandidateLists], folder: Path, train_cfg: TrainConfig | None,
            suffix: str = ".parquet") -> tuple[Side, Side, dict[str, list[str]], dict[str, float]]:
    """Write ``lists`` as a candidate log (with side tables) under ``folder``, read it back, audit both and, given
    ``train_cfg``, train it on both. Returns (built-in, log), the fields that differ per split, and facts."""
    log_path, users, items = (folder / f"candidates{suffix}", folder / f"users{suffix}", folder / f"items{suffix}")
    t0 = time.perf_counter()
    rows = candidate_log.write_log(dataset, lists, log_path)
    candidate_log.write_sides(dataset, users, items)
    t1 = time.perf_counter()
    log_dataset, log_lists = candidate_log.read_log(candidate_log.LogFiles(log_path, users, items),
                                                    dataset.history_len, dataset.name)
    t2 = time.perf_counter()
    built = Side("built-in", lists, audit.audit(lists, candidates.item_counts(dataset)))
    logged = Side("candidate log", log_lists, audit.audit(log_lists, candidate_log.item_counts(log_dataset, log_lists)))
    if train_cfg is not None:
        built.run = runner.train_run(dataset, lists, train_cfg, progress=False)
        logged.run = runner.train_run(log_dataset, log_lists, train_cfg, progress=False)
    facts = {"rows": rows, "bytes": log_path.stat().st_size, "write_s": t1 - t0, "read_s": t2 - t1,
             "same_items": float(log_dataset.item_ids == dataset.item_ids),
             "same_users": float(log_dataset.user_ids == dataset.user_ids)}
    return built, logged, differences(lists, log_lists), facts


def render(built: Side, logged: Side, diffs: dict[str, list[str]], facts: dict[str, float], command: str) -> str:
    lines = ["# The candidate-log path against the built-in lists", "",
             f"Produced by `{command}`: the default sampler's ML-100K lists written as a candidate log "
             f"({facts['rows']:,} rows, {facts['bytes'] / 2**20:.1f} MiB Parquet, written in {facts['write_s']:.1f} s, "
             f"read back in {facts['read_s']:.1f} s), with the user and item side tables, and read back through "
             "`training/candidate_log.py`.", "", "## Arrays", "",
             f"Item vocabulary identical: {'yes' if facts['same_items'] else 'NO'}; user order identical: "
             f"{'yes' if facts['same_users'] else 'NO'}.", "",
             "| split | lists | fields that differ |", "|---|---|---|"]
    for split, fields in diffs.items():
        lines.append(f"| {split} | {len(built.lists[split]):,} | {', '.join(fields) or 'none'} |")
    lines += ["", "`fold` names the out-of-fold MF that scored a built-in training list; a log has one production "
              "retriever, so every logged list carries the pre-validation fold (-1). Nothing reads it in training.",
              "", "## Leakage audit (test N@6, %)", "", "| ranking | built-in | candidate log |", "|---|---|---|"]
    for name in built.audit.n6:
        lines.append(f"| {name} | {built.audit.n6[name]:.2f} | {logged.audit.n6[name]:.2f} |")
    lines += [f"| verdict | {built.audit.verdict} | {logged.audit.verdict} |", "",
              "Popularity differs by definition: the built-in path counts every interaction before each user's "
              "validation slate (ratings below 3 and unlisted history included), which a log does not hold; the log "
              "path counts each item's label-1 candidates on the training lists."]
    if built.run is not None and logged.run is not None:
        lines += ["", f"## {built.run.variant}, seed {built.run.seed}", "",
                  "| path | valid N@6 | test N@6 | best epoch |", "|---|---|---|---|"]
        for side in (built, logged):
            assert side.run is not None
            lines.append(f"| {side.name} | {side.run.valid['N@6']:.2f} | {side.run.test['N@6']:.2f} | "
                         f"{side.run.best_epoch} |")
    return "\n".join(lines) + "\n"


def run(out_reports: Path, work: Path, train_cfg: TrainConfig | None, command: str,
        retr_cfg: retriever.RetrieverConfig | None = None, list_cfg: candidates.ListConfig | None = None) -> Path:
    """ML-100K's default lists through both paths; the report's path."""
    dataset = data.prepare(data.load("ml100k"))
    retr = retriever.fit_retrievers(dataset, retr_cfg or retriever.RetrieverConfig())
    lists = candidates.build_all_lists(dataset, retr, list_cfg or candidates.ListConfig())
    built, logged, diffs, facts = compare(dataset, lists, work, train_cfg)
    out_reports.mkdir(parents=True, exist_ok=True)
    path = out_reports / "log_roundtrip.md"
    path.write_text(render(built, logged, diffs, facts, command))
    return path

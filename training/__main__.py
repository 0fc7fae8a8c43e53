"""The offline pipeline's one CLI.

    python -m training stats                       # dataset statistics table
    python -m training pipeline                    # stats -> retriever -> variants x seeds -> report -> export
    python -m training pipeline --variants prm,prm-concat --seeds 3 --out-reports reports --out-models models
    python -m training pipeline --variants prm-concat,dnr-g --lambda-e 5 --lx-estimator w1
    python -m training report --name ml100k        # redraw reports/ml100k.md and its plots from the saved runs
    python -m training pipeline --dataset ml1m --path ~/data/ml-1m
    python -m training pipeline --dataset table --path ratings.parquet --users users.csv --items items.csv

Every flag has a --help; config dataclasses are filled from the flags, never from dicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from training import data, evaluate, export, metrics, retriever
from training.train import VARIANTS, TrainConfig

T = TypeVar("T")


@dataclass
class DataConfig:
    dataset: str = field(default="ml100k", metadata={"help": "ml100k (bundled in the recbole wheel), ml1m or table"})
    path: Path | None = field(default=None, metadata={
        "help": "ml1m: folder with ratings.dat/users.dat/movies.dat; table: the ratings CSV or Parquet"})
    users: Path | None = field(default=None, metadata={"help": "table: optional user side-feature file"})
    items: Path | None = field(default=None, metadata={"help": "table: optional item side-feature file"})
    core: int = field(default=20, metadata={"help": "iterative k-core filter on users and items"})
    history_len: int = field(default=30, metadata={"help": "history items per user state"})
    candidates: int = field(default=50, metadata={"help": "candidates per list (slate items + unseen top-scored)"})


@dataclass
class RunConfig:
    variants: str = field(default=",".join(["retriever", *VARIANTS]),
                          metadata={"help": "comma-separated variants to train and report"})
    seeds: int = field(default=5, metadata={"help": "seeds per variant (0 .. seeds-1)"})
    out_reports: Path = field(default=Path("reports"), metadata={"help": "report folder"})
    out_models: Path = field(default=Path("models"), metadata={"help": "exported model folder"})
    version: str = field(default="", metadata={"help": "model version name (default: <dataset>-<variant>-<time>)"})
    export: bool = field(default=True, metadata={"help": "export the best variant on validation"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model version"})
    progress: bool = field(default=True, metadata={"help": "progress bars and per-run lines"})


def add_config(parser: argparse.ArgumentParser, cls: type[Any], prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (but ``skip``), typed and with the field's help."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
            continue
        kind: Any = {int: int, float: float, str: str}.get(type(default), Path)
        parser.add_argument(flag, type=kind, default=default, help=f"{f.metadata['help']} (default: {default})")


def from_args(cls: type[T], args: argparse.Namespace, prefix: str = "") -> T:
    """The dataclass from its flags; skipped fields keep their defaults."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if hasattr(args, prefix + f.name)}
    return cls(**values)


def load_dataset(cfg: DataConfig) -> data.Dataset:
    ratings = data.load(cfg.dataset, cfg.path, cfg.users, cfg.items)
    return data.prepare(ratings, core=cfg.core, history_len=cfg.history_len)


def cmd_stats(args: argparse.Namespace) -> None:
    print(data.stats_table(load_dataset(from_args(DataConfig, args))))


def cmd_pipeline(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    data_cfg = from_args(DataConfig, args)
    run_cfg = from_args(RunConfig, args)
    retr_cfg = from_args(retriever.RetrieverConfig, args, "mf_")
    train_cfg = from_args(TrainConfig, args)
    dataset = load_dataset(data_cfg)
    print(data.stats_table(dataset), flush=True)

    scores = retriever.train_retriever(dataset, retr_cfg)
    lists = retriever.build_all_lists(dataset, scores, data_cfg.candidates)
    retr_auc = retriever.heldout_auc(dataset, scores)
    list_auc = {s: float(np.nanmean(metrics.auc(lists[s].scores, lists[s].labels, lists[s].mask)) * 100)
                for s in ("train", "test")}
    print(f"retriever held-out AUC {retr_auc:.4f}; list AUC train {list_auc['train']:.2f}, "
          f"test {list_auc['test']:.2f}", flush=True)

    variants = [v.strip() for v in run_cfg.variants.split(",") if v.strip()]
    runs = evaluate.run_variants(dataset, lists, variants, list(range(run_cfg.seeds)), train_cfg,
                                 run_cfg.progress)
    info: dict[str, Any] = {
        "command": "python -m training " + shlex.join(sys.argv[1:]),
        "retriever_heldout_auc": retr_auc,
        "retriever_train_list_auc": list_auc["train"],
        "retriever_test_list_auc": list_auc["test"],
        "data": dataclasses.asdict(data_cfg),
        "retriever": dataclasses.asdict(retr_cfg),
        "reranker": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in {"variant", "seed"}},
    }
    trained = [r for r in runs if r.result is not None]
    if trained:
        info["best_variant"] = evaluate.best_variant(runs)
    info["wall_seconds"] = round(time.perf_counter() - t0)
    evaluate.save_runs(run_cfg.out_reports, dataset, lists, runs, info)
    report = evaluate.write_report(run_cfg.out_reports, dataset.name)
    print(f"report: {report}", flush=True)

    if run_cfg.export and trained:
        best = info["best_variant"]
        # The best variant's seed with the best validation N@6 (the choice never looks at test).
        run = max((r for r in trained if r.variant == best), key=lambda r: r.valid["N@6"])
        assert run.result is not None
        version = run_cfg.version or f"{dataset.name}-{best}-{time.strftime('%Y%m%d-%H%M%S')}"
        config = {"data": info["data"], "retriever": info["retriever"],
                  "reranker": dataclasses.asdict(dataclasses.replace(train_cfg, variant=best, seed=run.seed))}
        offline = {"test": run.test, "valid": run.valid, "retriever_heldout_auc": retr_auc}
        path = export.export(run.result.model, dataset, lists, run_cfg.out_models, version, config, offline,
                             overwrite=run_cfg.overwrite)
        manifest_parity = json.loads((path / "manifest.json").read_text())["parity"]
        print(f"exported {path} (parity: max |diff| {manifest_parity['max_abs_diff']:.3g}, identical top-6 "
              f"{manifest_parity['topk_identical']:.4f})", flush=True)
    print(f"pipeline wall time {time.perf_counter() - t0:.0f} s", flush=True)


def cmd_choices(args: argparse.Namespace) -> None:
    dnr = [v for v in VARIANTS if VARIANTS[v].synthetic]
    if args.variant not in dnr:
        raise ValueError(f"--variant {args.variant!r} is not one of the DNR variants {dnr}")
    data_cfg = from_args(DataConfig, args)
    train_cfg = from_args(TrainConfig, args)
    dataset = load_dataset(data_cfg)
    scores = retriever.train_retriever(dataset, from_args(retriever.RetrieverConfig, args, "mf_"))
    lists = retriever.build_all_lists(dataset, scores, data_cfg.candidates)
    rows = evaluate.compare_choices(dataset, lists, args.variant, list(range(args.seeds)), train_cfg,
                                    evaluate.CHOICES, args.progress)
    path = evaluate.write_choices(args.out_reports, dataset.name, args.variant, rows,
                                  "python -m training " + shlex.join(sys.argv[1:]))
    print(f"choices: {path}", flush=True)


def cmd_report(args: argparse.Namespace) -> None:
    print(f"report: {evaluate.write_report(args.out_reports, args.name)}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="print the dataset statistics table")
    add_config(stats, DataConfig)
    stats.set_defaults(func=cmd_stats)
    pipe = sub.add_parser("pipeline", help="retriever, variants x seeds, report, export")
    add_config(pipe, DataConfig)
    add_config(pipe, RunConfig)
    add_config(pipe, retriever.RetrieverConfig, "mf_")
    add_config(pipe, TrainConfig, skip=("variant", "seed"))
    pipe.set_defaults(func=cmd_pipeline)
    choices = sub.add_parser("choices", help="compare the choices the paper leaves open, on validation")
    add_config(choices, DataConfig)
    add_config(choices, retriever.RetrieverConfig, "mf_")
    add_config(choices, TrainConfig, skip=("variant", "seed"))
    choices.add_argument("--variant", default="dnr-g", help="the DNR variant to train (default: dnr-g)")
    choices.add_argument("--seeds", type=int, default=1, help="seeds per choice (default: 1)")
    choices.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    choices.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    choices.set_defaults(func=cmd_choices)
    report = sub.add_parser("report", help="redraw <name>.md, its csv and plots from the saved run files")
    report.add_argument("--name", default="ml100k", help="dataset name of the run files (default: ml100k)")
    report.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    report.set_defaults(func=cmd_report)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (data.DataError, export.ParityError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

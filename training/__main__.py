"""The offline pipeline's one CLI.

    python -m training stats                       # dataset statistics table
    python -m training pipeline                    # stats -> retrievers -> lists + audit per sampler ->
                                                   # variants x seeds -> regimes -> report -> export
    python -m training pipeline --sampler uniform --regime-samplers ""   # another default, no regimes table
    python -m training pipeline --variants prm,prm-concat --seeds 3 --out-reports reports --out-models models
    python -m training pipeline --variants prm-concat,dnr-g --lambda-e 5 --lx-estimator w1
    python -m training report --name ml100k        # redraw reports/ml100k.md and its plots from the saved runs
    python -m training capacity --variant prm --capacities 64x1,128x2   # N@6 beside CPU cost, fp32 and int8
    python -m training pipeline --dataset ml1m --path ~/data/ml-1m
    python -m training pipeline --dataset table --path ratings.parquet --users users.csv --items items.csv
    python -m training stats --dataset table --path ml-20m/ratings.csv --columns userId=user_id,movieId=item_id
    python -m training pipeline --dataset log --path candidates.parquet --users users.csv --items items.csv
    python -m training write-log --out build/ml100k-log/candidates.parquet   # ML-100K's lists as a candidate log
    python -m training log-roundtrip               # those lists through the log path: same arrays, audit, PRM N@6
    python -m training scale --factors 1,10,100    # time and peak RSS per stage on the synthetic log
    torchrun --nproc_per_node 2 -m training fit --variant prm --threads 1   # data-parallel (training/distributed.py)
    python -m training ddp --procs 2 --seeds 0,1,2 # one process against torchrun: N@6 and epoch time

Every flag has a --help; config dataclasses are filled from the flags, never from dicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from training import (
    audit,
    candidate_log,
    candidates,
    capacity,
    data,
    ddp_report,
    distributed,
    evaluate,
    export,
    log_roundtrip,
    report,
    retriever,
    runner,
    scale,
)
from training.train import VARIANTS, TrainConfig, resolve_device

T = TypeVar("T")
# The regime of the paper's own protocol (not leak-free; audited and reported beside the valid one).
PAPER = "paper protocol"


@dataclass
class DataConfig:
    dataset: str = field(default="ml100k", metadata={
        "help": "ml100k (bundled in the recbole wheel), ml1m, table (a ratings table) or log (a candidate log: "
                "your retriever's logged lists and their feedback, training/candidate_log.py)"})
    path: Path | None = field(default=None, metadata={
        "help": "ml1m: folder with ratings.dat/users.dat/movies.dat; table: the ratings CSV or Parquet; log: the "
                "candidate log CSV or Parquet"})
    users: Path | None = field(default=None, metadata={"help": "table, log: optional user side-feature file"})
    items: Path | None = field(default=None, metadata={"help": "table, log: optional item side-feature file"})
    columns: str = field(default="", metadata={
        "help": "table, log: SOURCE=TARGET renames applied to every file before its columns are checked, "
                "comma-separated (MovieLens-20M: userId=user_id,movieId=item_id)"})
    core: int = field(default=20, metadata={"help": "iterative k-core filter on users and items"})
    history_len: int = field(default=30, metadata={"help": "history items per user state"})


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
    regime_samplers: str = field(default="uniform,popularity,retrieved", metadata={
        "help": "samplers of the regimes table (retriever, prm, best pathway, dnr-g, dnr-b under each); "
                "empty: none"})
    regime_seeds: int = field(default=3, metadata={"help": "seeds per variant in the regimes table (0 .. n-1)"})
    regime_variants: str = field(default="", metadata={
        "help": "variants of the regimes tables (comma-separated); empty: retriever, prm, the best score pathway "
                "and the best DNR variant on validation, each if the main table ran it"})
    paper_protocol: bool = field(default=True, metadata={
        "help": "also run the regime variants on the paper's own protocol (one MF on a random 80%% of all "
                "interactions, candidates = the slate + that MF's top unseen items): INVALID by the audit, reported "
                "beside the valid protocol"})
    controlled_aucs: str = field(default="0.80,0.85,0.90,0.95", metadata={
        "help": "semi-synthetic regimes: retriever scores sigmoid(logit(MF) + gamma (2z - 1) + noise) with gamma set "
                "so the training lists' list AUC is each of these (comma-separated); empty: none"})
    controlled_sigma: float = field(default=1.0, metadata={"help": "std of the controlled regimes' logit noise"})
    controlled_seeds: int = field(default=3, metadata={"help": "seeds per variant in each controlled regime"})
    jobs: int = field(default=0, metadata={
        "help": "training processes at once, each with --threads torch threads (0: one per --threads cores)"})
    run_cache: str = field(default="build/runs", metadata={
        "help": "folder of finished runs: a rerun with the same configs and training code reuses them, so an "
                "interrupted pipeline resumes; empty: no cache"})


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


def add_run_configs(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("variant", "seed")) -> None:
    """The flags of what a training command reads: data, lists, the MF retrievers (``--mf-*``) and training."""
    add_config(parser, DataConfig)
    add_config(parser, candidates.ListConfig)
    add_config(parser, retriever.RetrieverConfig, "mf_")
    add_config(parser, TrainConfig, skip=skip)


def from_args(cls: type[T], args: argparse.Namespace, prefix: str = "") -> T:
    """The dataclass from its flags; skipped fields keep their defaults."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if hasattr(args, prefix + f.name)}
    return cls(**values)


LOGGED = "logged"  # the one regime of a candidate log: the lists as the production retriever scored them


def load_dataset(cfg: DataConfig) -> data.Dataset:
    if cfg.dataset == LOG:
        return load_log(cfg)[0]
    ratings = data.load(cfg.dataset, cfg.path, cfg.users, cfg.items, data.parse_columns(cfg.columns))
    return data.prepare(ratings, core=cfg.core, history_len=cfg.history_len)


LOG = "log"


def log_files(cfg: DataConfig) -> candidate_log.LogFiles:
    if cfg.path is None:
        raise data.DataError("log: pass the candidate log CSV or Parquet file with --path")
    return candidate_log.LogFiles(cfg.path, cfg.users, cfg.items, data.parse_columns(cfg.columns))


def load_log(cfg: DataConfig) -> tuple[data.Dataset, dict[str, candidates.CandidateLists]]:
    return candidate_log.read_log(log_files(cfg), cfg.history_len)


def cmd_stats(args: argparse.Namespace) -> None:
    print(data.stats_table(load_dataset(from_args(DataConfig, args))))


def audited_lists(dataset: data.Dataset, retr: retriever.RetrieverScores, cfg: candidates.ListConfig,
                  name: str = "") -> tuple[dict[str, candidates.CandidateLists], audit.Audit]:
    """The lists of ``cfg.sampler`` and their leakage audit, printed loudly when it fails."""
    lists = candidates.build_all_lists(dataset, retr, cfg)
    result = audit.audit(lists, candidates.item_counts(dataset))
    print_audit(result, name or f"sampler {cfg.sampler}")
    return lists, result


def print_audit(result: audit.Audit, what: str) -> None:
    """The audit's test N@6 per ranking and its verdict, loudly when it fails."""
    figures = " | ".join(f"{name} {value:.2f}" for name, value in result.n6.items())
    auc = result.list_auc
    print(f"leakage audit, {what}: test N@6 {figures}; retriever list AUC train {auc['train']:.2f}, "
          f"test {auc['test']:.2f}", flush=True)
    if result.valid:
        print(f"leakage audit, {what}: VALID", flush=True)
    else:
        bar = "!" * 100
        print(f"{bar}\nLEAKAGE AUDIT, {what}: {result.verdict}\n{bar}", flush=True)


def run_cache(folder: str, dataset: data.Dataset, data_cfg: DataConfig, retr_cfg: retriever.RetrieverConfig,
              list_cfg: candidates.ListConfig) -> runner.RunCache | None:
    """The run cache shared by every command over the same data, retrievers and lists ("" for none)."""
    context: dict[str, Any] = {"data": dataclasses.asdict(data_cfg), "retriever": dataclasses.asdict(retr_cfg),
                               "lists": {k: v for k, v in dataclasses.asdict(list_cfg).items() if k != "sampler"}}
    if data_cfg.dataset == LOG:  # the log lives outside the repository: its bytes are the key
        context = {"data": dataclasses.asdict(data_cfg), "log": log_files(data_cfg).digest()}
    return runner.RunCache(Path(folder) / dataset.name, context) if folder else None


def names(csv_list: str) -> list[str]:
    return [v.strip() for v in csv_list.split(",") if v.strip()]


@dataclasses.dataclass
class Regimes:
    """Every regime's lists and audit: the default sampler first, then the paper's protocol, the controlled
    regimes (name -> gamma) and the other samplers."""

    default: str
    lists_of: dict[str, dict[str, candidates.CandidateLists]]
    audits: dict[str, audit.Audit]
    controlled: dict[str, float]
    paper: list[str]
    others: list[str]

    @property
    def order(self) -> list[str]:
        """The regimes after the default, in training order: the paper's protocol and the controlled regimes
        first, since they answer the first question."""
        return [*self.paper, *self.controlled, *self.others]


def build_regimes(dataset: data.Dataset, retr: retriever.RetrieverScores, retr_cfg: retriever.RetrieverConfig,
                  list_cfg: candidates.ListConfig, run_cfg: RunConfig) -> Regimes:
    default, samplers = list_cfg.sampler, names(run_cfg.regime_samplers)
    lists_of, audits = {}, {}
    for sampler in dict.fromkeys([default, *samplers]):
        cfg = dataclasses.replace(list_cfg, sampler=sampler)
        lists_of[sampler], audits[sampler] = audited_lists(dataset, retr, cfg)
    if run_cfg.paper_protocol:
        paper_retr = retriever.fit_paper_retriever(dataset, retr_cfg)
        paper_cfg = dataclasses.replace(list_cfg, sampler="top")
        lists_of[PAPER], audits[PAPER] = audited_lists(dataset, paper_retr, paper_cfg, name=PAPER)
    controlled: dict[str, float] = {}
    for target in [float(a) for a in names(run_cfg.controlled_aucs)]:
        name = f"controlled AUC {target:.2f} (sigma {run_cfg.controlled_sigma:g})"
        lists_of[name], controlled[name] = candidates.controlled_lists(lists_of[default], target,
                                                                       run_cfg.controlled_sigma)
        audits[name] = audit.audit(lists_of[name], candidates.item_counts(dataset))
        print(f"{name}: gamma {controlled[name]:.3f}, list AUC train {audits[name].list_auc['train']:.2f}, "
              f"test {audits[name].list_auc['test']:.2f} (semi-synthetic)", flush=True)
    return Regimes(default, lists_of, audits, controlled, [PAPER] if run_cfg.paper_protocol else [],
                   [s for s in samplers if s != default])


def log_regimes(dataset: data.Dataset, lists: dict[str, candidates.CandidateLists], run_cfg: RunConfig) -> Regimes:
    """A candidate log's regimes: its own lists, audited (popularity = each item's label-1 count on the training
    lists), and the controlled regimes built on them that its scores can reach."""
    counts = candidate_log.item_counts(dataset, lists)
    lists_of, audits = {LOGGED: lists}, {LOGGED: audit.audit(lists, counts)}
    print_audit(audits[LOGGED], LOGGED)
    controlled: dict[str, float] = {}
    for target in [float(a) for a in names(run_cfg.controlled_aucs)]:
        name = f"controlled AUC {target:.2f} (sigma {run_cfg.controlled_sigma:g})"
        try:
            lists_of[name], controlled[name] = candidates.controlled_lists(lists, target, run_cfg.controlled_sigma)
        except ValueError as exc:
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        audits[name] = audit.audit(lists_of[name], counts)
    return Regimes(LOGGED, lists_of, audits, controlled, [], [])


def train_regimes(pool: runner.Runner, regimes: Regimes, run_cfg: RunConfig, train_cfg: TrainConfig
                  ) -> tuple[list[runner.Run], dict[str, list[runner.Run]]]:
    """The main table's variants x seeds under the default sampler, then the key variants in every regime."""
    variants, fixed_key = names(run_cfg.variants), names(run_cfg.regime_variants)
    trained_variants = [v for v in variants if v != evaluate.RETRIEVER]
    n_key = len([v for v in fixed_key if v != evaluate.RETRIEVER]) if fixed_key else evaluate.regime_count(variants)
    key_runs = run_cfg.regime_seeds * len(regimes.paper + regimes.others) \
        + run_cfg.controlled_seeds * len(regimes.controlled)
    pool.plan(len(trained_variants) * run_cfg.seeds + n_key * key_runs)
    runs = evaluate.run_variants(pool, regimes.default, variants, list(range(run_cfg.seeds)), train_cfg)
    key = fixed_key or evaluate.regime_variants(runs)
    by_regime = {regimes.default: [r for r in runs if r.variant in key]}
    for regime in regimes.order:
        seeds = run_cfg.controlled_seeds if regime in regimes.controlled else run_cfg.regime_seeds
        if run_cfg.progress:
            print(f"regime {regime}: {', '.join(key)} x {seeds} seeds", flush=True)
        by_regime[regime] = evaluate.run_variants(pool, regime, key, list(range(seeds)), train_cfg)
    return runs, by_regime


def export_shipped(runs: list[runner.Run], dataset: data.Dataset, lists: dict[str, candidates.CandidateLists],
                   info: dict[str, Any], regimes: Regimes, train_cfg: TrainConfig, run_cfg: RunConfig) -> None:
    """Export the shipped variant's seed with the best validation N@6 (the choice never looks at test)."""
    best = info["shipped_variant"]
    run = max((r for r in runs if r.result is not None and r.variant == best), key=lambda r: r.valid["N@6"])
    assert run.result is not None
    version = run_cfg.version or f"{dataset.name}-{best}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {"data": info["data"], "lists": info["lists"], "retriever": info["retriever"],
              "reranker": dataclasses.asdict(dataclasses.replace(train_cfg, variant=best, seed=run.seed))}
    verdict = regimes.audits[regimes.default]
    offline = {"test": run.test, "valid": run.valid, "retriever_heldout_auc": info["retriever_heldout_auc"],
               "audit": {"sampler": regimes.default, "verdict": verdict.verdict, "n6": verdict.n6}}
    path = export.export(run.result.model, dataset, lists, run_cfg.out_models, version, config, offline,
                         overwrite=run_cfg.overwrite)
    manifest_parity = json.loads((path / "manifest.json").read_text())["parity"]
    print(f"exported {path} (parity: max |diff| {manifest_parity['max_abs_diff']:.3g}, identical top-6 "
          f"{manifest_parity['topk_identical']:.4f})", flush=True)


def default_regimes(data_cfg: DataConfig, retr_cfg: retriever.RetrieverConfig, list_cfg: candidates.ListConfig,
                    run_cfg: RunConfig) -> tuple[data.Dataset, Regimes, float, dict[str, Any]]:
    """The dataset, its regimes, the retriever's held-out AUC and what made the default lists: fitted retrievers
    and sampled negatives for a ratings table, the logged lists for a candidate log."""
    if data_cfg.dataset == LOG:
        dataset, logged = load_log(data_cfg)
        print(data.stats_table(dataset), flush=True)
        retr_auc = candidates.list_auc(logged["test"])
        print(f"logged retriever: list AUC on the test lists {retr_auc:.4f}", flush=True)
        lists_info = {"source": f"candidate log {data_cfg.path}", "sampler": LOGGED,
                      "candidates": logged["test"].items.shape[1]}
        return dataset, log_regimes(dataset, logged, run_cfg), retr_auc, lists_info
    dataset = load_dataset(data_cfg)
    print(data.stats_table(dataset), flush=True)
    retr = retriever.fit_retrievers(dataset, retr_cfg)
    retr_auc = retriever.heldout_auc(dataset, retr.pre_valid)
    print(f"retriever held-out AUC {retr_auc:.4f} ({retr_cfg.folds} out-of-fold MFs for the training lists)",
          flush=True)
    return dataset, build_regimes(dataset, retr, retr_cfg, list_cfg, run_cfg), retr_auc, dataclasses.asdict(list_cfg)


def default_lists(data_cfg: DataConfig, retr_cfg: retriever.RetrieverConfig, list_cfg: candidates.ListConfig
                  ) -> tuple[data.Dataset, str, dict[str, candidates.CandidateLists]]:
    """The dataset, the default regime's name and its audited lists (one sampler, or the candidate log)."""
    if data_cfg.dataset == LOG:
        dataset, lists = load_log(data_cfg)
        print_audit(audit.audit(lists, candidate_log.item_counts(dataset, lists)), LOGGED)
        return dataset, LOGGED, lists
    dataset = load_dataset(data_cfg)
    lists, _ = audited_lists(dataset, retriever.fit_retrievers(dataset, retr_cfg), list_cfg)
    return dataset, list_cfg.sampler, lists


def cmd_pipeline(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    data_cfg, list_cfg, run_cfg = from_args(DataConfig, args), from_args(candidates.ListConfig, args), \
        from_args(RunConfig, args)
    retr_cfg, train_cfg = from_args(retriever.RetrieverConfig, args, "mf_"), from_args(TrainConfig, args)
    evaluate.check_variants(names(run_cfg.variants))
    evaluate.check_variants(names(run_cfg.regime_variants))
    for sampler in names(run_cfg.regime_samplers):
        dataclasses.replace(list_cfg, sampler=sampler)  # refuses an unknown sampler before any training
    dataset, regimes, retr_auc, lists_info = default_regimes(data_cfg, retr_cfg, list_cfg, run_cfg)
    default, lists = regimes.default, regimes.lists_of[regimes.default]
    jobs = run_cfg.jobs or runner.default_jobs(train_cfg.threads)
    cache = run_cache(run_cfg.run_cache, dataset, data_cfg, retr_cfg, list_cfg)
    with runner.Runner(dataset, regimes.lists_of, jobs, cache, run_cfg.progress) as pool:
        runs, by_regime = train_regimes(pool, regimes, run_cfg, train_cfg)
    info: dict[str, Any] = {
        "command": "python -m training " + shlex.join(sys.argv[1:]),
        "retriever_heldout_auc": retr_auc,
        "data": dataclasses.asdict(data_cfg),
        "lists": lists_info,
        "retriever": dataclasses.asdict(retr_cfg) if data_cfg.dataset != LOG else {"source": "logged scores"},
        "reranker": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in {"variant", "seed"}},
        "jobs": jobs,
        "runs_trained": pool.trained,
        "runs_cached": pool.cached,
        "device": resolve_device(train_cfg.device),
        "controlled": {name: {"gamma": gamma, "sigma": run_cfg.controlled_sigma}
                       for name, gamma in regimes.controlled.items()},
    }
    trained = any(r.result is not None for r in runs)
    if trained:
        info["best_variant"] = evaluate.best_variant(runs)
        info["shipped_variant"], info["shipped_because"] = evaluate.shipped_variant(runs)
    info["wall_seconds"] = round(time.perf_counter() - t0)
    evaluate.save_runs(run_cfg.out_reports, dataset, lists, runs, info)
    evaluate.save_audits(run_cfg.out_reports, dataset.name, regimes.audits, default)
    evaluate.save_regimes(run_cfg.out_reports, dataset.name, by_regime)
    print(f"report: {report.write_report(run_cfg.out_reports, dataset.name)}", flush=True)
    if not regimes.audits[default].valid:
        print(f"{'!' * 100}\nTHE DEFAULT PROTOCOL IS INVALID (sampler {default}): {regimes.audits[default].verdict}\n"
              f"{'!' * 100}", flush=True)
    if run_cfg.export and trained:
        export_shipped(runs, dataset, lists, info, regimes, train_cfg, run_cfg)
    print(f"pipeline wall time {time.perf_counter() - t0:.0f} s", flush=True)


def cmd_choices(args: argparse.Namespace) -> None:
    dnr = [v for v in VARIANTS if VARIANTS[v].synthetic]
    if args.variant not in dnr:
        raise ValueError(f"--variant {args.variant!r} is not one of the DNR variants {dnr}")
    train_cfg = from_args(TrainConfig, args)
    dataset, regime, lists = default_lists(from_args(DataConfig, args), from_args(retriever.RetrieverConfig, args,
                                                                                  "mf_"),
                                           from_args(candidates.ListConfig, args))
    jobs = args.jobs or runner.default_jobs(train_cfg.threads)
    with runner.Runner(dataset, {regime: lists}, jobs, progress=args.progress) as pool:
        rows = evaluate.compare_choices(pool, regime, args.variant, list(range(args.seeds)), train_cfg,
                                        evaluate.CHOICES)
    path = report.write_choices(args.out_reports, dataset.name, args.variant, rows,
                                "python -m training " + shlex.join(sys.argv[1:]))
    print(f"choices: {path}", flush=True)


def cmd_capacity(args: argparse.Namespace) -> None:
    data_cfg = from_args(DataConfig, args)
    retr_cfg = from_args(retriever.RetrieverConfig, args, "mf_")
    list_cfg = from_args(candidates.ListConfig, args)
    train_cfg = dataclasses.replace(from_args(TrainConfig, args), variant=args.variant)
    capacities = capacity.parse_capacities(args.capacities)
    dataset, regime, lists = default_lists(data_cfg, retr_cfg, list_cfg)
    cfgs = [dataclasses.replace(train_cfg, hidden=h, layers=n, seed=seed) for h, n in capacities
            for seed in range(args.seeds)]
    cache = run_cache(args.run_cache, dataset, data_cfg, retr_cfg, list_cfg)
    with runner.Runner(dataset, {regime: lists}, args.jobs or runner.default_jobs(train_cfg.threads),
                       cache, args.progress) as pool:
        pool.plan(len(cfgs))
        runs = pool.run(regime, cfgs)
    rows = []
    for cfg, run in zip(cfgs, runs, strict=True):
        assert run.result is not None
        rows += capacity.measure(run.result.model, f"{cfg.hidden}x{cfg.layers}", cfg.seed, lists)
    info = {"cpu": platform.processor() or platform.machine(), "onnxruntime": capacity.ort.__version__,
            "threads_training": train_cfg.threads}
    path = capacity.write(args.out_reports, dataset.name, args.variant, rows,
                          "python -m training " + shlex.join(sys.argv[1:]), info)
    print(f"capacity: {path}", flush=True)


def cmd_write_log(args: argparse.Namespace) -> None:
    """The default sampler's lists as a candidate log, with side tables beside it (users.*, items.*)."""
    data_cfg = from_args(DataConfig, args)
    dataset, _, lists = default_lists(data_cfg, from_args(retriever.RetrieverConfig, args, "mf_"),
                                      from_args(candidates.ListConfig, args))
    out: Path = args.out
    rows = candidate_log.write_log(dataset, lists, out)
    candidate_log.write_sides(dataset, out.with_name(f"users{out.suffix}"), out.with_name(f"items{out.suffix}"))
    print(f"wrote {rows:,} candidate rows of {sum(len(cl) for cl in lists.values()):,} requests to {out}", flush=True)


def cmd_log_roundtrip(args: argparse.Namespace) -> None:
    train_cfg = dataclasses.replace(from_args(TrainConfig, args), variant=args.variant, seed=args.seed)
    path = log_roundtrip.run(args.out_reports, args.work, None if args.no_train else train_cfg,
                             "python -m training " + shlex.join(sys.argv[1:]),
                             from_args(retriever.RetrieverConfig, args, "mf_"), from_args(candidates.ListConfig, args))
    print(f"log round trip: {path}", flush=True)


def cmd_scale(args: argparse.Namespace) -> None:
    if args.one is not None:
        scale.main_one(args.one, args.json, args.train_lists, args.mf_epochs, args.mf_folds, args.threads)
        return
    if args.replot:
        print(f"scale: {scale.replot(args.out_reports)}", flush=True)
        return
    factors = [float(f) for f in names(args.factors)]
    path = scale.run(factors, args.out_reports, args.train_lists, args.mf_epochs, args.mf_folds, args.threads,
                     "python -m training " + shlex.join(sys.argv[1:]))
    print(f"scale: {path}", flush=True)


def cmd_fit(args: argparse.Namespace) -> None:
    """One variant at one seed on the default lists; under torchrun, data-parallel over its processes."""
    train_cfg = dataclasses.replace(from_args(TrainConfig, args), variant=args.variant, seed=args.seed)
    dataset, _, lists = default_lists(from_args(DataConfig, args), from_args(retriever.RetrieverConfig, args, "mf_"),
                                      from_args(candidates.ListConfig, args))
    world = distributed.join(resolve_device(train_cfg.device))
    try:
        run = runner.train_run(dataset, lists, train_cfg, progress=args.progress and world.rank == 0)
    finally:
        distributed.leave()
    assert run.result is not None
    out = {"variant": run.variant, "seed": run.seed, "processes": world.size, "threads": train_cfg.threads,
           "valid_n6": run.valid["N@6"], "test_n6": run.test["N@6"], "best_epoch": run.best_epoch,
           "epoch_seconds": [e["seconds"] for e in run.result.epochs]}
    if world.rank == 0:
        print(json.dumps(out), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out))


def cmd_ddp(args: argparse.Namespace) -> None:
    if args.replot:
        print(f"ddp: {ddp_report.replot(args.out_reports)}", flush=True)
        return
    path = ddp_report.run(args.procs, [int(s) for s in names(args.seeds)], args.variant, args.epochs,
                          args.out_reports, "python -m training " + shlex.join(sys.argv[1:]))
    print(f"ddp: {path}", flush=True)


def cmd_report(args: argparse.Namespace) -> None:
    print(f"report: {report.write_report(args.out_reports, args.name)}")


def add_log_commands(sub: Any) -> None:
    """write-log and log-roundtrip: the candidate-log path."""
    write = sub.add_parser("write-log", help="the default lists as a candidate log (and side tables beside it)")
    add_config(write, DataConfig)
    add_config(write, candidates.ListConfig)
    add_config(write, retriever.RetrieverConfig, "mf_")
    write.add_argument("--out", type=Path, default=Path("build/candidate-log/candidates.parquet"),
                       help="the log file, .parquet or .csv (default: build/candidate-log/candidates.parquet)")
    write.set_defaults(func=cmd_write_log)
    trip = sub.add_parser("log-roundtrip", help="ML-100K's lists through the candidate-log path against the "
                          "built-in path: arrays, audit, one variant's N@6 (reports/log_roundtrip.md)")
    add_config(trip, candidates.ListConfig)
    add_config(trip, retriever.RetrieverConfig, "mf_")
    add_config(trip, TrainConfig, skip=("variant", "seed"))
    trip.add_argument("--variant", default="prm", help="the variant trained on both (default: prm)")
    trip.add_argument("--seed", type=int, default=0, help="its seed (default: 0)")
    trip.add_argument("--no-train", action="store_true", help="arrays and audit only")
    trip.add_argument("--work", type=Path, default=Path("build/log-roundtrip"), help="where the log is written")
    trip.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    trip.set_defaults(func=cmd_log_roundtrip)


def add_scale_commands(sub: Any) -> None:
    """fit (data-parallel under torchrun), ddp and scale."""
    fit = sub.add_parser("fit", help="one variant at one seed on the default lists (data-parallel under torchrun)")
    add_run_configs(fit)
    fit.add_argument("--variant", default="prm", help="the variant (default: prm)")
    fit.add_argument("--seed", type=int, default=0, help="its seed (default: 0)")
    fit.add_argument("--json", type=Path, default=None, help="also write the figures here (rank 0)")
    fit.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    fit.set_defaults(func=cmd_fit)
    ddp = sub.add_parser("ddp", help="`fit` in one process against torchrun over --procs processes, per seed "
                         "(reports/ddp.md)")
    ddp.add_argument("--procs", type=int, default=2, help="torchrun processes (default: 2)")
    ddp.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: 0,1,2)")
    ddp.add_argument("--variant", default="prm", help="the variant (default: prm)")
    ddp.add_argument("--epochs", type=int, default=8, help="maximum epochs per run (default: 8)")
    ddp.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    ddp.add_argument("--replot", action="store_true", help="redraw ddp.md from ddp.json (adding the audit)")
    ddp.set_defaults(func=cmd_ddp)
    sc = sub.add_parser("scale", help="wall time and peak RSS per pipeline stage on the synthetic log at several "
                        "sizes (reports/scale.md)")
    sc.add_argument("--factors", default="1,10,100", help="multiples of ML-100K's interactions (default: 1,10,100)")
    sc.add_argument("--train-lists", type=int, default=20_000, help="training lists of the one train epoch")
    sc.add_argument("--mf-epochs", type=int, default=2, help="MF epochs (default: 2; the pipeline's is 30)")
    sc.add_argument("--mf-folds", type=int, default=2, help="out-of-fold MFs (default: 2; the pipeline's is 5)")
    sc.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    sc.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    sc.add_argument("--replot", action="store_true", help="redraw scale.md and scale.png from scale.json")
    sc.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    sc.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    sc.set_defaults(func=cmd_scale)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="print the dataset statistics table")
    add_config(stats, DataConfig)
    stats.set_defaults(func=cmd_stats)
    pipe = sub.add_parser("pipeline", help="retriever, variants x seeds, report, export")
    add_run_configs(pipe)
    add_config(pipe, RunConfig)
    pipe.set_defaults(func=cmd_pipeline)
    choices = sub.add_parser("choices", help="compare the choices the paper leaves open, on validation")
    add_run_configs(choices)
    choices.add_argument("--variant", default="dnr-g", help="the DNR variant to train (default: dnr-g)")
    choices.add_argument("--seeds", type=int, default=1, help="seeds per choice (default: 1)")
    choices.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    choices.add_argument("--jobs", type=int, default=0,
                         help="training processes at once (default 0: one per --threads cores)")
    choices.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    choices.set_defaults(func=cmd_choices)
    cap = sub.add_parser("capacity", help="a variant at each capacity, fp32 and int8: N@6 beside serving cost")
    add_run_configs(cap, skip=("variant", "seed", "hidden", "layers"))
    cap.add_argument("--variant", default="prm", help="the variant to measure (default: prm)")
    cap.add_argument("--capacities", default="64x1,128x2",
                     help="HIDDENxLAYERS, comma-separated (default: 64x1,128x2; the paper's size is 128x2)")
    cap.add_argument("--seeds", type=int, default=1, help="seeds per capacity (default: 1)")
    cap.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    cap.add_argument("--jobs", type=int, default=0, help="training processes at once (default 0: one per --threads "
                     "cores)")
    cap.add_argument("--run-cache", default="build/runs", help="folder of finished runs, shared with the pipeline "
                     "(default: build/runs); empty: no cache")
    cap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    cap.set_defaults(func=cmd_capacity)
    add_log_commands(sub)
    add_scale_commands(sub)
    redraw = sub.add_parser("report", help="redraw <name>.md, its csv and plots from the saved run files")
    redraw.add_argument("--name", default="ml100k", help="dataset name of the run files (default: ml100k)")
    redraw.add_argument("--out-reports", type=Path, default=Path("reports"), help="report folder (default: reports)")
    redraw.set_defaults(func=cmd_report)
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

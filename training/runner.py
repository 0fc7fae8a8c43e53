"""Where the runs of a pipeline execute: on ``jobs`` worker processes, each finished run kept on disk.

Owns: the run record (``Run``); the process pool (spawned workers, each holding the dataset and every sampler's
lists once); the run cache (one file per finished run, keyed by everything that decides its result, so an
interrupted pipeline resumes where it stopped and a changed config or changed training code never reuses a
stale run).
Does not know: how a variant trains (``train.py``), which runs a pipeline wants (``evaluate.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training import metrics
from training.candidates import CandidateLists
from training.data import Dataset
from training.train import TrainConfig, TrainResult, predict, resolve_device, train


@dataclass
class Run:
    """One variant at one seed: its figures, and the trained model when it trained (kept for export)."""

    variant: str
    seed: int
    test: dict[str, float]
    valid: dict[str, float]
    best_epoch: int = 0
    seconds_per_epoch: float = 0.0
    wall_seconds: float = 0.0
    result: TrainResult | None = None  # the trained model, kept for export
    test_n6: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per-list test N@6 (fraction)


# The modules whose code decides a run's figures; a change to any of them invalidates every cached run.
RESULT_MODULES = ("data", "retriever", "candidates", "model", "generator", "train", "metrics")


def code_hash() -> str:
    root = Path(__file__).parent
    digest = hashlib.sha256(torch.__version__.encode())
    for name in RESULT_MODULES:
        digest.update((root / f"{name}.py").read_bytes())
    return digest.hexdigest()


def default_jobs(threads: int) -> int:
    """One worker per ``threads`` cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, threads))


@dataclass(frozen=True)
class RunCache:
    """Finished runs on disk, one ``<key>.pt`` each. ``context`` holds every config the runs share (data,
    lists but the sampler, retriever); the key adds the sampler, the full TrainConfig and ``code``, the hash of
    the training code taken when the cache opens (what this process runs, whatever is edited on disk later)."""

    folder: Path
    context: dict[str, Any]
    code: str = field(default_factory=lambda: code_hash())

    def path(self, sampler: str, cfg: TrainConfig) -> Path:
        # The device that runs, not the setting: an "auto" run on a GPU host is not the CPU run of the same key.
        train_doc = dataclasses.asdict(dataclasses.replace(cfg, device=resolve_device(cfg.device)))
        doc = {"code": self.code, "context": self.context, "sampler": sampler, "train": train_doc}
        key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", sampler).strip("-")
        return self.folder / f"{cfg.variant}-seed{cfg.seed}-{slug}-{key}.pt"

    def load(self, sampler: str, cfg: TrainConfig) -> Run | None:
        path = self.path(sampler, cfg)
        if not path.exists():
            return None
        try:
            run: Run = torch.load(path, weights_only=False)
        except Exception:  # a file cut short by a kill: train again
            return None
        return run

    def save(self, sampler: str, cfg: TrainConfig, run: Run) -> None:
        path = self.path(sampler, cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(run, tmp)
        tmp.replace(path)  # never a half-written run under the final name


def train_run(dataset: Dataset, lists: dict[str, CandidateLists], cfg: TrainConfig, progress: bool) -> Run:
    """Train one variant at one seed and score it on the test lists."""
    t0 = time.perf_counter()
    result = train(dataset, lists, cfg, progress)
    test = lists["test"]
    test_scores = predict(result.model, test)
    return Run(cfg.variant, cfg.seed, metrics.evaluate(test_scores, test.labels, test.mask), result.best_valid,
               result.best_epoch, result.seconds_per_epoch, time.perf_counter() - t0, result,
               metrics.ndcg_at_k(test_scores, test.labels, mask=test.mask))


# A worker's copy of the data, set once by the pool's initializer (sent once per worker, not once per run).
_WORKER: dict[str, Any] = {}


def _init_worker(dataset: Dataset, lists_of: dict[str, dict[str, CandidateLists]]) -> None:
    _WORKER["dataset"], _WORKER["lists_of"] = dataset, lists_of


def _worker_run(sampler: str, cfg: TrainConfig) -> Run:
    return train_run(_WORKER["dataset"], _WORKER["lists_of"][sampler], cfg, progress=False)


class Runner:
    """Runs (sampler, TrainConfig) jobs: from the cache when there, else in this process (``jobs`` 1) or on a
    pool of ``jobs`` spawned workers. Results come back in the order asked, whatever order they finish in."""

    def __init__(self, dataset: Dataset, lists_of: dict[str, dict[str, CandidateLists]], jobs: int = 1,
                 cache: RunCache | None = None, progress: bool = True) -> None:
        if jobs < 1:
            raise ValueError(f"jobs {jobs} must be >= 1")
        self.dataset, self.lists_of, self.jobs, self.cache, self.progress = dataset, lists_of, jobs, cache, progress
        self._pool: ProcessPoolExecutor | None = None
        self.cached = 0  # runs read from the cache (trained by an earlier invocation)
        self.trained = 0  # runs trained by this one
        self._bar: tqdm[Any] | None = None

    def plan(self, total: int) -> None:
        """Show one progress bar over the ``total`` runs this runner will be asked for: runs trained, runs left
        and an ETA from the runs trained so far (a run found in the cache leaves the count, not the rate)."""
        if self.progress and total > 0:
            self._bar = tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True)

    def _advance(self, cached: bool) -> None:
        if self._bar is None:
            return
        if cached:
            self._bar.total = max(self._bar.n, (self._bar.total or 0) - 1)
            self._bar.set_postfix(cached=self.cached)
            self._bar.refresh()
        else:
            self._bar.update(1)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: a forked child of a process whose OpenMP pool has run can hang.
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.dataset, self.lists_of))
        return self._pool

    def run(self, sampler: str, cfgs: list[TrainConfig]) -> list[Run]:
        done: dict[int, Run] = {}
        todo: list[int] = []
        for i, cfg in enumerate(cfgs):
            cached = self.cache.load(sampler, cfg) if self.cache is not None else None
            if cached is not None:
                done[i] = cached
                self.cached += 1
                self._report(sampler, cached, "cached")
                self._advance(cached=True)
            else:
                todo.append(i)
        for i, run in self._train(sampler, [(i, cfgs[i]) for i in todo]):
            if self.cache is not None:
                self.cache.save(sampler, cfgs[i], run)
            done[i] = run
            self.trained += 1
            self._report(sampler, run, "")
            self._advance(cached=False)
        return [done[i] for i in range(len(cfgs))]

    def _train(self, sampler: str, jobs: list[tuple[int, TrainConfig]]) -> Iterator[tuple[int, Run]]:
        if self.jobs == 1 or len(jobs) <= 1:
            for i, cfg in jobs:
                yield i, train_run(self.dataset, self.lists_of[sampler], cfg, self.progress)
            return
        futures: dict[Future[Run], int] = {self.pool().submit(_worker_run, sampler, cfg): i for i, cfg in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def _report(self, sampler: str, run: Run, note: str) -> None:
        if not self.progress:
            return
        where = f" [{sampler}]" if len(self.lists_of) > 1 else ""
        tqdm.write(f"  {run.variant:<12} seed {run.seed}{where}: test N@6 {run.test['N@6']:.2f}, valid N@6 "
              f"{run.valid['N@6']:.2f} (epoch {run.best_epoch}), {run.seconds_per_epoch:.1f} s/epoch"
              f"{' (' + note + ')' if note else ''}")

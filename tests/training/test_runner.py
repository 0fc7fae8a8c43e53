"""Where runs execute: worker processes give the runs one process gives, in the order asked; the run cache
resumes finished runs, never reuses a run whose config or code differs, and retrains a file cut short."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.training.fixtures import TINY_TRAIN, Tiny
from training import runner
from training.runner import Run

CFG = dataclasses.replace(TINY_TRAIN, epochs=2, threads=1)


def figures(runs: list[Run]) -> list[tuple[str, int, float, list[float]]]:
    return [(r.variant, r.seed, r.test["N@6"], [e["valid_N@6"] for e in r.result.epochs] if r.result else [])
            for r in runs]


def test_workers_give_the_runs_one_process_gives_in_the_order_asked(tiny: Tiny) -> None:
    cfgs = [dataclasses.replace(CFG, variant=v, seed=s) for v in ("prm", "g") for s in (0, 1)]
    with runner.Runner(tiny.dataset, {"uniform": tiny.lists}, jobs=1, progress=False) as one:
        serial = one.run("uniform", cfgs)
    with runner.Runner(tiny.dataset, {"uniform": tiny.lists}, jobs=2, progress=False) as two:
        parallel = two.run("uniform", cfgs)
    assert [(r.variant, r.seed) for r in parallel] == [("prm", 0), ("prm", 1), ("g", 0), ("g", 1)]
    assert figures(parallel) == figures(serial)  # same seed, same thread count: same numbers in any process
    assert all(r.result is not None and r.result.model is not None for r in parallel)


def test_the_cache_resumes_finished_runs_and_only_identical_ones(tiny: Tiny, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = runner.RunCache(tmp_path, {"lists": {"candidates": 30}})
    lists_of = {"uniform": tiny.lists}
    first = runner.Runner(tiny.dataset, lists_of, cache=cache, progress=False).run("uniform", [CFG])
    first_path = cache.path("uniform", CFG)
    assert first_path.exists()

    calls: list[str] = []
    real = runner.train_run

    def counting(*args: object, **kwargs: object) -> Run:
        calls.append("trained")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "train_run", counting)
    resumed = runner.Runner(tiny.dataset, lists_of, cache=cache, progress=False)
    again = resumed.run("uniform", [CFG])
    assert calls == [] and figures(again) == figures(first) and (resumed.cached, resumed.trained) == (1, 0)

    # Another config, sampler, shared context or training code is another key.
    other = dataclasses.replace(CFG, lambda_c=0.3)
    assert cache.path("uniform", other) != cache.path("uniform", CFG)
    assert cache.path("popularity", CFG) != cache.path("uniform", CFG)
    assert runner.RunCache(tmp_path, {"lists": {"candidates": 20}}).path("uniform", CFG) != cache.path("uniform", CFG)
    monkeypatch.setattr(runner, "code_hash", lambda: "edited train.py")
    assert cache.path("uniform", CFG) == first_path  # an open cache keeps the hash of the code it runs
    assert runner.RunCache(tmp_path, cache.context).path("uniform", CFG) != first_path

    # A file cut short by a kill is trained again, and replaced.
    monkeypatch.undo()
    monkeypatch.setattr(runner, "train_run", counting)
    path = cache.path("uniform", CFG)
    path.write_bytes(path.read_bytes()[:100])
    retrained = runner.Runner(tiny.dataset, lists_of, cache=cache, progress=False).run("uniform", [CFG])
    assert calls == ["trained"] and figures(retrained) == figures(first)
    assert runner.RunCache(tmp_path, cache.context).load("uniform", CFG) is not None


def test_jobs_must_be_positive(tiny: Tiny) -> None:
    with pytest.raises(ValueError, match="jobs 0"):
        runner.Runner(tiny.dataset, {"uniform": tiny.lists}, jobs=0)

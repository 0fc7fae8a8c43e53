"""Data-parallel training: two gloo ranks, each on its share of a batch with averaged gradients, take the step one
process takes on the whole batch; and ``torchrun`` runs the pipeline's ``fit`` over two CPU processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import distributed

X = torch.arange(32, dtype=torch.float32).reshape(8, 4) / 10
Y = torch.linspace(-1, 1, 8)[:, None]


def model_and_opt(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, rows: np.ndarray) -> None:
    loss = torch.nn.functional.mse_loss(model(X[rows]), Y[rows])
    opt.zero_grad()
    loss.backward()
    opt.step()


def rank_main(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    world = distributed.World(rank, 2)
    model, opt = model_and_opt(seed=rank)  # different seeds: the broadcast must make them one model
    distributed.broadcast(model, world)
    distributed.average_gradients(opt, world)
    for _ in range(3):
        step(model, opt, world.shard(np.arange(8)))
    if rank == 0:
        torch.save(model.state_dict(), out)
    distributed.leave()


def test_two_ranks_take_the_whole_batch_step(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_main, args=(f"file://{tmp_path / 'store'}", str(out)), nprocs=2, join=True)
    model, opt = model_and_opt(seed=0)
    for _ in range(3):
        step(model, opt, np.arange(8))
    ranks = torch.load(out)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[name], value, rtol=1e-5, atol=1e-6)
    # and not trivially: one rank's share alone goes elsewhere
    alone, alone_opt = model_and_opt(seed=0)
    for _ in range(3):
        step(alone, alone_opt, np.arange(8)[::2])
    assert not torch.allclose(alone[0].weight, model[0].weight, atol=1e-4)


def test_one_process_is_not_sharded() -> None:
    rows = np.arange(10)
    assert np.array_equal(distributed.World().shard(rows), rows)
    assert distributed.World(1, 3).shard(rows).tolist() == [1, 4, 7]


@pytest.mark.slow
def test_torchrun_fits_over_two_processes(synthetic_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ratings, users, items = synthetic_files
    args = ["-m", "training", "fit", "--dataset", "table", "--path", str(ratings), "--users", str(users),
            "--items", str(items), "--core", "10", "--history-len", "8", "--candidates", "30", "--sampler", "uniform",
            "--mf-dim", "8", "--mf-epochs", "5", "--mf-folds", "3", "--epochs", "2", "--patience", "2",
            "--batch-size", "64", "--hidden", "32", "--heads", "2", "--layers", "1", "--threads", "1",
            "--no-progress"]
    figures = {}
    for procs in (1, 2):
        out = tmp_path / f"{procs}.json"
        launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        subprocess.run([sys.executable, *launcher, *args, "--json", str(out)], check=True, timeout=600)
        figures[procs] = json.loads(out.read_text())
    assert figures[2]["processes"] == 2 and figures[1]["processes"] == 1
    assert len(figures[2]["epoch_seconds"]) == len(figures[1]["epoch_seconds"]) == 2
    # the same arithmetic as one process (up to float sums in another order): the same model, within a hair
    assert 0 < figures[2]["valid_n6"] <= 100 and abs(figures[2]["valid_n6"] - figures[1]["valid_n6"]) < 2.0

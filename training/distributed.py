"""Data-parallel training with torch.distributed, launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 2 -m training fit --variant prm --seed 0 --threads 1
    python -m training ddp --procs 2 --seeds 0,1,2       # one process against torchrun: reports/ddp.md

Owns: joining the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), each rank's share of
a batch, and gradient averaging. Does not know: the model, the losses or the data.

Every rank builds the same lists and the same model (same seeds; rank 0's weights are broadcast to make sure),
draws the same order of training lists, and takes every ``world``-th list of each batch, with random draws
(dropout, noise) of its own; a hook before each
optimiser step all-reduces the gradients and divides by the world size, so one step sees the whole batch, as in
one process, and the epoch has the same number of steps and the same learning-rate schedule. Every rank evaluates
the whole validation set on identical weights, so every rank takes the same early-stopping decision. This is
DistributedDataParallel's arithmetic without its wrapper: the reranker's step calls it through methods other than
``forward`` (``encode_with_state``, the generator's step on the frozen reranker), which the wrapper does not see.
Without torchrun's environment nothing here is called and training is one process, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's lists of one batch: every ``size``-th, from ``rank``."""
        return rows[self.rank :: self.size] if self.parallel else rows


def launched() -> bool:
    """Whether torchrun started this process (its environment names a world)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device: str) -> World:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); one process when not launched by torchrun."""
    if not launched():
        return World()
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    """Leave the process group once every rank is done (a rank that tears gloo down while another still talks to
    it aborts)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(module: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if world.parallel:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


def average_gradients(optimizer: torch.optim.Optimizer, world: World) -> None:
    """Before each step of ``optimizer``: its gradients summed over the ranks (one flat all-reduce) and divided by
    the world size."""
    if not world.parallel:
        return

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    optimizer.register_step_pre_hook(hook)

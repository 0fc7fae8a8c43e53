"""Training the reranker on candidate lists: BCE, early stopping on validation N@6, fixed seeds.

Owns: the training loop, batching of ``CandidateLists`` into tensors, prediction, reproducibility.
Does not know: data files, the retriever's internals or ONNX.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import metrics
from training.data import Dataset
from training.model import ModelConfig, Reranker
from training.retriever import CandidateLists

# Variant name -> retriever-score pathway of the PRM backbone.
VARIANTS = {"prm": "none", "prm-concat": "concat", "prm-add": "add", "prm-weight": "weight"}


@dataclass
class TrainConfig:
    variant: str = field(default="prm", metadata={"help": f"reranker variant: {', '.join(VARIANTS)}"})
    # 30 / 8: on ML-100K validation N@6 plateaus around epochs 5-8 and then climbs again until ~25; with
    # patience 3-4 some seeds stopped on the plateau (test N@6 ~22) and others did not (~29), so the
    # comparison measured early-stopping luck.
    epochs: int = field(default=30, metadata={"help": "maximum training epochs"})
    patience: int = field(default=8, metadata={"help": "epochs without a better validation N@6 before stopping"})
    batch_size: int = field(default=512, metadata={"help": "lists per batch (paper: 2048 on ML-1M)"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay (paper: 1e-3)"})
    # 64 / 1 layer rather than the paper's 128 / 2: ~7.5 s instead of ~26 s an epoch on 2 cores, and on
    # ML-100K one seed of each reached the same validation N@6 in a 12-epoch probe (README, deviations).
    hidden: int = field(default=64, metadata={"help": "hidden size (paper: 128)"})
    heads: int = field(default=2, metadata={"help": "attention heads"})
    layers: int = field(default=1, metadata={"help": "transformer layers over the candidates (paper size: 2)"})
    dropout: float = field(default=0.3, metadata={"help": "dropout (paper: 0.3)"})
    seed: int = field(default=0, metadata={"help": "reranker seed"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {sorted(VARIANTS)}")


@dataclass
class TrainResult:
    model: Reranker
    best_epoch: int
    best_valid: dict[str, float]
    epochs: list[dict[str, float]] = field(default_factory=list)  # epoch, loss, seconds, valid metrics

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([e["seconds"] for e in self.epochs]))


def seed_everything(seed: int, threads: int) -> None:
    """Same seed, same machine, same result: fixed RNGs, deterministic kernels, fixed thread count."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Filling every new tensor with NaN (the deterministic-mode default) costs ~6% and buys no
    # reproducibility here: no kernel reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def to_tensors(lists: CandidateLists, rows: np.ndarray | slice | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs (and labels) for ``rows`` of ``lists``."""
    sub = lists if rows is None else lists.subset(rows)
    return {
        "items": torch.from_numpy(sub.items),
        "scores": torch.from_numpy(sub.scores),
        "mask": torch.from_numpy(sub.mask),
        "history": torch.from_numpy(sub.history),
        "profile": torch.from_numpy(sub.profile),
        "labels": torch.from_numpy(sub.labels),
    }


def build_model(dataset: Dataset, cfg: TrainConfig, n_candidates: int) -> Reranker:
    model_cfg = ModelConfig(
        n_items=dataset.n_items,
        item_field_sizes=[len(f.vocab) for f in dataset.item_fields],
        user_field_sizes=[len(f.vocab) for f in dataset.user_fields],
        max_candidates=n_candidates,
        history_len=dataset.history_len,
        hidden=cfg.hidden,
        heads=cfg.heads,
        layers=cfg.layers,
        dropout=cfg.dropout,
        pathway=VARIANTS[cfg.variant],
    )
    return Reranker(model_cfg, [torch.from_numpy(f.tokens) for f in dataset.item_fields])


def list_positions(n_lists: int, n_candidates: int) -> torch.Tensor:
    """Offline lists are stored in retriever order, so position = index (what the graph derives too)."""
    return torch.arange(n_candidates)[None].expand(n_lists, n_candidates)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the real candidates of a batch."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def predict(model: Reranker, lists: CandidateLists, batch_size: int = 1024) -> np.ndarray:
    """(N, L) logits of ``model`` on ``lists`` in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        t = to_tensors(lists, slice(start, start + batch_size))
        positions = list_positions(len(t["items"]), t["items"].shape[1])
        out.append(model(t["items"], t["scores"], t["mask"], t["history"], t["profile"], positions).numpy())
    return np.concatenate(out) if out else np.zeros((0, lists.items.shape[1]), dtype=np.float32)


def train(dataset: Dataset, lists: dict[str, CandidateLists], cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a PRM variant with BCE on the train lists; keep the epoch with the best validation N@6."""
    seed_everything(cfg.seed, cfg.threads)
    n_candidates = lists["train"].items.shape[1]
    model = build_model(dataset, cfg, n_candidates)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_lists, valid = lists["train"], lists["valid"]
    best: tuple[float, int, dict[str, torch.Tensor], dict[str, float]] | None = None
    epochs: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.variant} seed {cfg.seed}", leave=False, disable=not progress)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train_lists), generator=gen).numpy()
        total, batches = 0.0, 0
        for start in range(0, len(perm), cfg.batch_size):
            t = to_tensors(train_lists, perm[start : start + cfg.batch_size])
            positions = list_positions(len(t["items"]), n_candidates)
            logits = model(t["items"], t["scores"], t["mask"], t["history"], t["profile"], positions)
            loss = masked_bce(logits, t["labels"], t["mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        seconds = time.perf_counter() - t0
        scores = predict(model, valid)
        valid_metrics = metrics.evaluate(scores, valid.labels, valid.mask)
        epochs.append({"epoch": epoch, "loss": total / max(batches, 1), "seconds": seconds,
                       **{f"valid_{k}": v for k, v in valid_metrics.items()}})
        bar.set_postfix(loss=f"{total / max(batches, 1):.4f}", n6=f"{valid_metrics['N@6']:.2f}")
        if best is None or valid_metrics["N@6"] > best[0]:
            best = (valid_metrics["N@6"], epoch, copy.deepcopy(model.state_dict()), valid_metrics)
        elif epoch - best[1] >= cfg.patience:
            break
    assert best is not None, "epochs must be >= 1"
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, best[1], best[3], epochs)

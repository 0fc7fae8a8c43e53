"""The first stage: a matrix-factorisation retriever and the 50-candidate lists it produces.

Owns: MF trained with BCE and negative sampling on each user's interactions before the validation slate,
its held-out AUC, and the candidate lists (slate items + top-scored unseen items, in retriever order).
Does not know: the reranker, its losses or ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.data import ITEM_OFFSET, PAD, Dataset, Slates, history


@dataclass
class RetrieverConfig:
    dim: int = field(default=64, metadata={"help": "MF embedding size"})
    epochs: int = field(default=30, metadata={"help": "MF training epochs"})
    negatives: int = field(default=4, metadata={"help": "uniformly sampled negatives per positive"})
    batch_size: int = field(default=4096, metadata={"help": "MF batch size (interactions)"})
    lr: float = field(default=5e-3, metadata={"help": "MF Adam learning rate"})
    weight_decay: float = field(default=1e-6, metadata={"help": "MF Adam weight decay"})
    seed: int = field(default=0, metadata={"help": "MF seed (the candidate lists depend on it)"})


class MF(nn.Module):
    """score(u, i) = sigmoid(p_u . q_i + b_i), a probability in [0, 1]."""

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.user.weight, std=0.05)
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.zeros_(self.bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.user(users) * self.item(items)).sum(-1) + self.bias(items).squeeze(-1)  # logits


def seen_before_valid(dataset: Dataset) -> list[np.ndarray]:
    """Per user, the item indices of every interaction before the validation slate."""
    cut = {int(u): int(s) for u, s in zip(dataset.splits["valid"].user, dataset.splits["valid"].start,
                                          strict=True)}
    return [dataset.seq_items[u][: cut[u]] for u in range(len(dataset.user_ids))]


def train_retriever(dataset: Dataset, cfg: RetrieverConfig) -> np.ndarray:
    """Fit MF on the interactions before each user's validation slate; return the frozen (U, I) scores.

    Column i of the result scores item index i; padding and OOV columns are 0.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train = seen_before_valid(dataset)
    users = torch.from_numpy(np.concatenate([np.full(len(s), u) for u, s in enumerate(train)]))
    items = torch.from_numpy(np.concatenate(train))
    model = MF(len(dataset.user_ids), dataset.n_items, cfg.dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_real = len(dataset.item_ids)
    for _ in tqdm(range(cfg.epochs), desc="retriever", leave=False):
        perm = torch.randperm(len(users), generator=gen)
        for start in range(0, len(users), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            u, pos = users[idx], items[idx]
            neg = torch.randint(ITEM_OFFSET, ITEM_OFFSET + n_real, (len(idx), cfg.negatives), generator=gen)
            logits = torch.cat([model(u, pos)[:, None], model(u[:, None].expand_as(neg), neg)], dim=1)
            target = torch.zeros_like(logits)
            target[:, 0] = 1.0
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = model.user.weight @ model.item.weight.T + model.bias.weight.T  # (U, I)
        scores = torch.sigmoid(logits).numpy().astype(np.float32)
    scores[:, :ITEM_OFFSET] = 0.0
    return scores


def heldout_auc(dataset: Dataset, scores: np.ndarray) -> float:
    """Mean per-user AUC of the validation and test slate items against every item the user never rated.

    These pairs were never seen in training: it measures the retriever as a ranker of unseen items.
    """
    aucs = []
    for split in ("valid", "test"):
        s = dataset.splits[split]
        for u, start in zip(s.user, s.start, strict=True):
            pos = dataset.seq_items[u][start : start + dataset.slate_size]
            unseen = np.ones(dataset.n_items, dtype=bool)
            unseen[:ITEM_OFFSET] = False
            unseen[dataset.seq_items[u]] = False
            neg_scores = np.sort(scores[u, unseen])
            # AUC = share of (pos, neg) pairs ordered right, ties 1/2.
            below = np.searchsorted(neg_scores, scores[u, pos], side="left")
            ties = np.searchsorted(neg_scores, scores[u, pos], side="right") - below
            aucs.append(float(((below + 0.5 * ties) / len(neg_scores)).mean()))
    return float(np.mean(aucs))


@dataclass
class CandidateLists:
    """Fixed-length candidate lists in retriever order, ready for the reranker.

    Position p of a list is the p-th best retriever score; the slate items sit wherever their scores put
    them, never first by construction.
    """

    user: np.ndarray  # (N,) int64 user index
    items: np.ndarray  # (N, L) int64 item indices
    scores: np.ndarray  # (N, L) float32 retriever scores in [0, 1], non-increasing along L
    labels: np.ndarray  # (N, L) float32 z for slate items, 0 for the others
    mask: np.ndarray  # (N, L) bool, False on padding
    history: np.ndarray  # (N, H) int64 items before the slate, most recent last, PAD-left-padded
    profile: np.ndarray  # (N, F) int64 user profile tokens

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, rows: np.ndarray | slice) -> CandidateLists:
        return CandidateLists(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def build_lists(dataset: Dataset, scores: np.ndarray, slates: Slates, n_candidates: int = 50) -> CandidateLists:
    """For each slate: its items plus the (n_candidates - slate_size) best-scored items the user never
    interacted with, sorted by descending retriever score (ties by item index)."""
    k = dataset.slate_size
    n_neg = n_candidates - k
    n = len(slates)
    items = np.zeros((n, n_candidates), dtype=np.int64)
    labels = np.zeros((n, n_candidates), dtype=np.float32)
    negatives: dict[int, np.ndarray] = {}
    for row, (u, start) in enumerate(zip(slates.user, slates.start, strict=True)):
        if u not in negatives:
            masked = scores[u].copy()
            masked[:ITEM_OFFSET] = -np.inf
            masked[dataset.seq_items[u]] = -np.inf
            order = np.lexsort((np.arange(len(masked)), -masked))
            negatives[u] = order[:n_neg]
        items[row, :k] = dataset.seq_items[u][start : start + k]
        labels[row, :k] = dataset.seq_z[u][start : start + k]
        items[row, k:] = negatives[u]
    row_scores = np.take_along_axis(scores[slates.user], items, axis=1)
    order = np.lexsort((items, -row_scores), axis=1)
    items = np.take_along_axis(items, order, axis=1)
    return CandidateLists(
        user=slates.user.copy(),
        items=items,
        scores=np.take_along_axis(row_scores, order, axis=1).astype(np.float32),
        labels=np.take_along_axis(labels, order, axis=1),
        mask=items != PAD,
        history=history(dataset, slates),
        profile=dataset.profile()[slates.user],
    )


def build_all_lists(dataset: Dataset, scores: np.ndarray, n_candidates: int = 50) -> dict[str, CandidateLists]:
    return {split: build_lists(dataset, scores, slates, n_candidates) for split, slates in dataset.splits.items()}

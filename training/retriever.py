"""The first stage: matrix-factorisation retrievers, fitted so that no list is scored by a model that saw it.

Owns: MF trained with BCE and negative sampling; the pre-validation MF (fitted on each user's interactions
before the validation slate; it scores validation and test lists); the K out-of-fold MFs (fold k is fitted
on the same interactions minus the training slates assigned to fold k, and scores only those slates'
lists); the fold assignment; the retriever's held-out AUC.
Does not know: candidate lists (``candidates.py``), the reranker, its losses or ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.data import ITEM_OFFSET, Dataset

PRE_VALID = -1  # the fold id of lists scored by the pre-validation MF (validation and test lists)


@dataclass
class RetrieverConfig:
    dim: int = field(default=64, metadata={"help": "MF embedding size"})
    epochs: int = field(default=30, metadata={"help": "MF training epochs"})
    negatives: int = field(default=4, metadata={"help": "uniformly sampled negatives per positive"})
    batch_size: int = field(default=4096, metadata={"help": "MF batch size (interactions)"})
    lr: float = field(default=5e-3, metadata={"help": "MF Adam learning rate"})
    weight_decay: float = field(default=1e-6, metadata={"help": "MF Adam weight decay"})
    seed: int = field(default=0, metadata={"help": "MF seed (the candidate lists depend on it)"})
    folds: int = field(default=5, metadata={
        "help": "out-of-fold MFs scoring the training lists: fold k's lists are scored by an MF fitted without "
                "fold k's slates"})

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds {self.folds} must be >= 2 (each training list needs an MF that did not see it)")


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


BLOCK_SCORES = 1 << 24  # scores held per MF at once (64 MiB of float32): one block of users x every item


class MFScores:
    """A fitted MF's frozen factors, read like its (U, I) score matrix: ``scores[u]`` is user u's row, and
    ``scores[users, items]`` gathers. Rows are computed a block of users at a time (as many as fit in
    ``block_scores`` scores; every user at once on ML-100K, where the values are the dense matrix's to the bit)
    and the last block is kept, so memory is the factors plus one block, whatever the catalogue's size.
    Column i scores item index i; padding and OOV columns are 0."""

    def __init__(self, user: torch.Tensor, item: torch.Tensor, bias: torch.Tensor, block_scores: int = BLOCK_SCORES
                 ) -> None:
        self.user, self.item, self.bias = user.detach(), item.detach(), bias.detach()  # (U, d), (I, d), (I, 1)
        self.shape = (len(self.user), len(self.item))
        self.block = max(1, min(self.shape[0], block_scores // max(self.shape[1], 1)))
        self._cached: tuple[int, np.ndarray] | None = None

    def _rows(self, b: int) -> np.ndarray:
        """Block ``b``'s rows (users b * block .. (b + 1) * block - 1)."""
        if self._cached is None or self._cached[0] != b:
            with torch.no_grad():
                users = self.user[b * self.block : (b + 1) * self.block]
                scores = torch.sigmoid(users @ self.item.T + self.bias.T).numpy().astype(np.float32)
            scores[:, :ITEM_OFFSET] = 0.0
            self._cached = (b, scores)
        return self._cached[1]

    def row(self, u: int) -> np.ndarray:
        """(I,) user ``u``'s scores (a view into the cached block: copy it to keep it)."""
        return self._rows(u // self.block)[u % self.block]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            if np.ndim(key) == 0:
                return self.row(int(key))
            key = (np.asarray(key)[..., None], np.arange(self.shape[1]))  # rows of these users: (..., I)
        users, cols = key
        if np.ndim(users) == 0:
            return self.row(int(users))[cols]
        users, cols = np.broadcast_arrays(np.asarray(users), np.asarray(cols))
        out = np.empty(users.shape, dtype=np.float32)
        for b in np.unique(users // self.block):
            at = users // self.block == b
            out[at] = self._rows(int(b))[users[at] % self.block, cols[at]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The dense (U, I) matrix: for small data and tests only."""
        dense = np.concatenate([self._rows(b).copy() for b in range(-(-self.shape[0] // self.block))])
        return dense if dtype is None else dense.astype(dtype)


@dataclass
class RetrieverScores:
    """Frozen MFs and which one scores which list.

    ``fold[s]`` is the fold of training slate ``s`` (row ``s`` of ``dataset.splits["train"]``); its list is scored
    by ``fold_scores[fold[s]]``.
    """

    pre_valid: MFScores  # the MF fitted before each user's validation slate
    fold_scores: list[MFScores]  # K out-of-fold MFs
    fold: np.ndarray  # (n_train_slates,) int64 in 0..K-1


def seen_before_valid(dataset: Dataset) -> list[np.ndarray]:
    """Per user, the item indices of every interaction before the validation slate."""
    cut = {int(u): int(s) for u, s in zip(dataset.splits["valid"].user, dataset.splits["valid"].start,
                                          strict=True)}
    return [dataset.seq_items[u][: cut[u]] for u in range(len(dataset.user_ids))]


def assign_folds(dataset: Dataset, folds: int, seed: int = 0) -> np.ndarray:
    """(n_train_slates,) fold of each training slate, balanced within each user.

    Each user's training slates are shuffled and dealt round-robin from a random starting fold, so every
    fold holds out about 1/K of every user's training slates (no user loses most of its history in one fold).
    """
    rng = np.random.default_rng([seed, folds])
    train = dataset.splits["train"]
    out = np.zeros(len(train), dtype=np.int64)
    for u in np.unique(train.user):
        rows = np.flatnonzero(train.user == u)
        out[rng.permutation(rows)] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return out


def fold_interactions(dataset: Dataset, fold: np.ndarray, k: int) -> list[np.ndarray]:
    """Per user, the item indices fold ``k``'s MF is fitted on: everything before the validation slate except
    the items of the training slates assigned to fold ``k``."""
    keep = [np.ones(len(s), dtype=bool) for s in seen_before_valid(dataset)]
    train, size = dataset.splits["train"], dataset.slate_size
    for u, start in zip(train.user[fold == k], train.start[fold == k], strict=True):
        keep[u][start : start + size] = False
    return [items[mask] for items, mask in zip(seen_before_valid(dataset), keep, strict=True)]


def fit_mf(dataset: Dataset, interactions: list[np.ndarray], cfg: RetrieverConfig, desc: str = "retriever"
           ) -> MFScores:
    """Fit MF on ``interactions`` (per user, item indices) and return its frozen scores."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    users = torch.from_numpy(np.concatenate([np.full(len(s), u) for u, s in enumerate(interactions)]))
    items = torch.from_numpy(np.concatenate(interactions))
    model = MF(len(dataset.user_ids), dataset.n_items, cfg.dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_real = len(dataset.item_ids)
    for _ in tqdm(range(cfg.epochs), desc=desc, leave=False):
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
    return MFScores(model.user.weight, model.item.weight, model.bias.weight)


def train_retriever(dataset: Dataset, cfg: RetrieverConfig) -> MFScores:
    """The pre-validation MF: fitted on the interactions before each user's validation slate."""
    return fit_mf(dataset, seen_before_valid(dataset), cfg)


def fit_retrievers(dataset: Dataset, cfg: RetrieverConfig) -> RetrieverScores:
    """The pre-validation MF and the ``cfg.folds`` out-of-fold MFs (K + 1 fits, same settings and seed)."""
    fold = assign_folds(dataset, cfg.folds, cfg.seed)
    pre_valid = train_retriever(dataset, cfg)
    fold_scores = [fit_mf(dataset, fold_interactions(dataset, fold, k), cfg, f"retriever fold {k}")
                   for k in range(cfg.folds)]
    return RetrieverScores(pre_valid, fold_scores, fold)


def heldout_auc(dataset: Dataset, scores: MFScores | np.ndarray) -> float:
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
            row = scores[u]
            neg_scores = np.sort(row[unseen])
            # AUC = share of (pos, neg) pairs ordered right, ties 1/2.
            below = np.searchsorted(neg_scores, row[pos], side="left")
            ties = np.searchsorted(neg_scores, row[pos], side="right") - below
            aucs.append(float(((below + 0.5 * ties) / len(neg_scores)).mean()))
    return float(np.mean(aucs))


def fit_paper_retriever(dataset: Dataset, cfg: RetrieverConfig, share: float = 0.8) -> RetrieverScores:
    """The paper's retriever (Appendix D.1, E.1): one MF fitted on a random ``share`` of all interactions,
    validation and test slates included, scoring every list. Not leak-free: it has seen most of the slates it
    scores, train and test alike; the audit says so."""
    rng = np.random.default_rng([cfg.seed, 80])
    kept = [items[rng.random(len(items)) < share] for items in dataset.seq_items]
    scores = fit_mf(dataset, kept, cfg, "paper retriever")
    return RetrieverScores(scores, [scores], np.zeros(len(dataset.splits["train"]), dtype=np.int64))


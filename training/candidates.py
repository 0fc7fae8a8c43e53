"""The 50-candidate lists the reranker learns from and is evaluated on.

Owns: ``CandidateLists``; the negative samplers; list composition (the slate's items + negatives drawn for
each list separately, labels z on slate items and 0 on negatives) and order (descending retriever score).
Does not know: how the retrievers were fitted (``retriever.py``), the reranker, or the audit (``audit.py``).

A list of slate s (user u) is scored by the MF that did not see s: the out-of-fold MF of s's fold for a
training slate, the pre-validation MF for a validation or test slate. Its negatives are drawn, with a
generator seeded by (``list_seed``, split), from the items u had not interacted with up to and including s
nor anywhere before u's validation slate. The second condition matters for training lists: an item u meets
between s and validation is one u will choose, and the out-of-fold MF, which saw it, ranks it near the top;
labelled 0, such items filled 49% of the retriever's top 6 on ML-100K training lists (0% on test lists, which
have no later interactions), and a reranker learned that a high score means a negative. Items of the
validation and test slates stay eligible on training lists, so a memory of which items were drawn as a user's
negatives tells nothing about that user's validation and test labels (the audit's memorisation order).
Samplers:

- ``uniform``: every such item alike;
- ``popularity``: proportional to (interactions before validation)^power, an exposure-like distribution;
- ``retrieved``: uniformly from the ``pool`` such items the scoring MF ranks highest;
- ``top``: the scoring MF's best items among those u never interacted with at all: the paper's protocol
  (section 4.1, E.1), with ``retriever.fit_paper_retriever``; it fails the leakage audit (every list of a user
  shares its negatives) and is reported as a regime, never as a default.

``controlled_lists`` makes the semi-synthetic regime whose retriever informativeness is set on purpose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from training import metrics
from training.data import ITEM_OFFSET, PAD, Dataset, history
from training.retriever import PRE_VALID, RetrieverScores, seen_before_valid

SAMPLERS = ("uniform", "popularity", "retrieved", "top")
SPLITS = ("train", "valid", "test")


@dataclass
class ListConfig:
    candidates: int = field(default=50, metadata={"help": "candidates per list (the slate + negatives)"})
    # popularity, not uniform: under uniform negatives the popularity order alone scores far above random on
    # the test lists (positives are popular, negatives are not), a shortcut no exposure log offers;
    # reports/ml100k.md holds the audit of every sampler.
    sampler: str = field(default="popularity", metadata={"help": f"negative sampler: {', '.join(SAMPLERS)}"})
    pool: int = field(default=200, metadata={"help": "retrieved sampler: draw from the MF's top-N eligible items"})
    popularity_power: float = field(default=0.75, metadata={
        "help": "popularity sampler: weight = (interactions before validation)^power"})
    list_seed: int = field(default=0, metadata={"help": "seed of the negative draws"})

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if self.pool < 1 or self.popularity_power < 0:
            raise ValueError(f"pool {self.pool} must be >= 1 and popularity_power {self.popularity_power} >= 0")


@dataclass
class CandidateLists:
    """Fixed-length candidate lists in retriever order, ready for the reranker.

    Position p of a list is the p-th best retriever score; the slate items sit wherever their scores put
    them. Lists with fewer eligible negatives than asked for are padded at the end (``mask`` False).
    """

    user: np.ndarray  # (N,) int64 user index
    items: np.ndarray  # (N, L) int64 item indices
    scores: np.ndarray  # (N, L) float32 retriever scores in [0, 1], non-increasing along the real candidates
    labels: np.ndarray  # (N, L) float32 z for slate items, 0 for the others
    mask: np.ndarray  # (N, L) bool, False on padding
    history: np.ndarray  # (N, H) int64 items before the slate, most recent last, PAD-left-padded
    profile: np.ndarray  # (N, F) int64 user profile tokens
    fold: np.ndarray  # (N,) int64 the out-of-fold MF that scored the list; PRE_VALID (-1) for the pre-valid MF

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, rows: np.ndarray | slice) -> CandidateLists:
        return CandidateLists(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def item_counts(dataset: Dataset) -> np.ndarray:
    """(n_items,) interactions per item index before each user's validation slate (0 for PAD and OOV)."""
    return np.bincount(np.concatenate(seen_before_valid(dataset)), minlength=dataset.n_items).astype(np.float64)


def draw(rng: np.random.Generator, eligible: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` of ``eligible`` without replacement, with probability proportional to ``weights``.

    Efraimidis-Spirakis: the ``n`` largest keys log(U) / w. A zero weight is floored far below every
    positive one, so such an item is drawn only when nothing else is left.
    """
    keys = np.log(rng.random(len(eligible))) / np.maximum(weights, 1e-12)
    if len(eligible) <= n:
        return eligible[np.argsort(-keys, kind="stable")]
    top = np.argpartition(-keys, n - 1)[:n]
    return eligible[top[np.argsort(-keys[top], kind="stable")]]


def build_lists(dataset: Dataset, retr: RetrieverScores, split: str, cfg: ListConfig) -> CandidateLists:
    """The lists of ``split``: each slate's items plus negatives drawn for that list alone (module docstring),
    sorted by descending score of the MF that did not see the slate (ties by item index)."""
    slates = dataset.splits[split]
    k, n = dataset.slate_size, len(slates)
    n_neg = cfg.candidates - k
    if n_neg < 0:
        raise ValueError(f"candidates {cfg.candidates} is smaller than the slate size {k}")
    if split == "train":
        matrices, fold = retr.fold_scores, retr.fold.copy()
    else:
        matrices, fold = [retr.pre_valid], np.full(n, PRE_VALID, dtype=np.int64)
    before_valid = seen_before_valid(dataset)
    counts = item_counts(dataset)
    base = counts**cfg.popularity_power if cfg.sampler == "popularity" else np.ones(dataset.n_items)
    rng = np.random.default_rng([cfg.list_seed, SPLITS.index(split)])
    items = np.full((n, cfg.candidates), PAD, dtype=np.int64)
    labels = np.zeros((n, cfg.candidates), dtype=np.float32)
    row_scores = np.zeros((n, cfg.candidates), dtype=np.float32)
    for row, (u, start) in enumerate(zip(slates.user, slates.start, strict=True)):
        scores = matrices[max(int(fold[row]), 0)][u]
        eligible = np.ones(dataset.n_items, dtype=bool)
        eligible[:ITEM_OFFSET] = False
        # Never an item u meets before validation, even one met after this slate: such an item is one u will
        # choose, and a test list has none of them among its negatives (module docstring).
        eligible[dataset.seq_items[u][: start + k]] = False
        eligible[before_valid[u]] = False
        if cfg.sampler == "top":
            eligible[dataset.seq_items[u]] = False
        pool = np.flatnonzero(eligible)
        if cfg.sampler == "top":
            negatives = pool[np.lexsort((pool, -scores[pool]))[:n_neg]]
        else:
            if cfg.sampler == "retrieved":
                pool = pool[np.lexsort((pool, -scores[pool]))[: cfg.pool]]
            negatives = draw(rng, pool, base[pool], n_neg)
        items[row, :k] = dataset.seq_items[u][start : start + k]
        labels[row, :k] = dataset.seq_z[u][start : start + k]
        items[row, k : k + len(negatives)] = negatives
        row_scores[row] = np.where(items[row] != PAD, scores[items[row]], 0.0)
    return in_retriever_order(CandidateLists(
        user=slates.user.copy(), items=items, scores=row_scores, labels=labels, mask=items != PAD,
        history=history(dataset, slates), profile=dataset.profile()[slates.user], fold=fold))


def in_retriever_order(lists: CandidateLists) -> CandidateLists:
    """``lists`` with each list's candidates sorted by descending score (ties by item index), padding last."""
    order = np.lexsort((lists.items, np.where(lists.mask, -lists.scores, np.inf)), axis=1)
    take = {name: np.take_along_axis(getattr(lists, name), order, axis=1)
            for name in ("items", "scores", "labels", "mask")}
    return dataclasses.replace(lists, **take)


def with_signal(lists: CandidateLists, gamma: float, sigma: float, seed: int) -> CandidateLists:
    """Semi-synthetic scores x = sigmoid(logit(s) + gamma (2z - 1) + sigma n), n ~ N(0, 1) seeded, on the real
    candidates of ``lists`` (s: the MF score), the lists re-sorted by x: a retriever whose informativeness about
    the label is set by ``gamma`` (and blurred by ``sigma``)."""
    rng = np.random.default_rng(seed)
    s = np.clip(lists.scores.astype(np.float64), 1e-4, 1 - 1e-4)
    logit = np.log(s) - np.log1p(-s) + gamma * (2 * lists.labels - 1) + sigma * rng.standard_normal(s.shape)
    x = np.where(lists.mask, 1.0 / (1.0 + np.exp(-logit)), 0.0).astype(np.float32)
    return in_retriever_order(dataclasses.replace(lists, scores=x))


def list_auc(lists: CandidateLists) -> float:
    """Mean list AUC (fraction) of the scores against the labels."""
    return float(np.nanmean(metrics.auc(lists.scores, lists.labels, lists.mask)))


def controlled_lists(lists: dict[str, CandidateLists], target_auc: float, sigma: float = 1.0, seed: int = 0,
                     tolerance: float = 0.002) -> tuple[dict[str, CandidateLists], float]:
    """Every split of ``lists`` with semi-synthetic scores (``with_signal``) whose list AUC on the training lists
    is ``target_auc`` (within ``tolerance``), and the gamma that gives it: found by bisection, since with the
    noise draws fixed the list AUC rises with gamma. Each split keeps its own seeded noise."""
    seeds = {split: [seed, i] for i, split in enumerate(lists)}

    def build(gamma: float, split: str) -> CandidateLists:
        return with_signal(lists[split], gamma, sigma, int(np.random.default_rng(seeds[split]).integers(2**31)))

    lo, hi = -10.0, 10.0
    if not list_auc(build(lo, "train")) <= target_auc <= list_auc(build(hi, "train")):
        raise ValueError(f"a list AUC of {target_auc} is out of reach with sigma {sigma}")
    gamma = 0.0
    for _ in range(60):
        gamma = (lo + hi) / 2
        auc = list_auc(build(gamma, "train"))
        if abs(auc - target_auc) <= tolerance:
            break
        lo, hi = (gamma, hi) if auc < target_auc else (lo, gamma)
    return {split: build(gamma, split) for split in lists}, gamma


def build_all_lists(dataset: Dataset, retr: RetrieverScores, cfg: ListConfig) -> dict[str, CandidateLists]:
    return {split: build_lists(dataset, retr, split, cfg) for split in SPLITS}

"""The leakage audit: how far rankings that learn nothing get on the test lists, and whether that is sane.

Owns: the non-learned rankings (random order, retriever order, reversed retriever order, popularity order,
memorisation of each user's past labels), their test N@6, the retriever's list AUC per split, and the
verdict VALID / INVALID with its reasons. Does not know: how lists are built or any learned model.

A protocol is valid when (1) reversed retriever order is below retriever order (the retriever's order carries
signal in the right direction on held-out lists), (2) memorisation is no better than random order plus
noise (a model with item ids cannot score by remembering which items a user was shown as negatives before),
and (3) the retriever's list AUC on training lists is within ``max_auc_gap`` points of its AUC on validation
lists (a reranker learns what a score means from training lists; when they were scored by a model that had
seen their labels, or hold negatives the user meets later that the retriever ranks on top, the score means
something else there than on the lists it will be served).
"Noise" is ``max(min_tolerance, 3 x the standard error)`` of the per-list difference memorisation - random.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training import metrics
from training.candidates import CandidateLists

RANKINGS = ("random", "retriever", "reversed", "popularity", "memorisation")


@dataclass
class Audit:
    """Test N@6 (%) of every non-learned ranking and the verdict; ``per_list`` holds per-list N@6 (0..1)."""

    n6: dict[str, float]
    per_list: dict[str, np.ndarray] = field(repr=False)
    list_auc: dict[str, float]  # retriever list AUC (%) per split
    tolerance: float  # N@6 points memorisation may exceed random by
    reasons: list[str]  # why the protocol is invalid; empty when valid

    @property
    def valid(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        return "VALID" if self.valid else "INVALID: " + "; ".join(self.reasons)

    def best(self) -> tuple[str, float]:
        """The non-learned ranking with the highest test N@6: the bar every learned model must clear."""
        name = max(self.n6, key=lambda r: self.n6[r])
        return name, self.n6[name]


def list_auc(lists: CandidateLists) -> float:
    """Mean per-list AUC (%) of the retriever scores against the labels."""
    return float(np.nanmean(metrics.auc(lists.scores, lists.labels, lists.mask)) * 100)


def label_memory(train: CandidateLists, users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Bool, shaped like ``items`` (with ``users`` broadcast against it): item i was a real candidate labelled 0 in
    one of user u's training lists. Sorted (user, item) keys, not a users x items matrix: memory grows with the
    training candidates."""
    zero = train.mask & (train.labels == 0)
    rows, cols = np.nonzero(zero)
    seen = np.unique(train.user[rows].astype(np.int64) * n_items + train.items[rows, cols])
    keys = np.broadcast_to(users, np.shape(items)).astype(np.int64) * n_items + items
    at = np.minimum(np.searchsorted(seen, keys), max(len(seen) - 1, 0))
    return seen[at] == keys if len(seen) else np.zeros(np.shape(items), dtype=bool)


def ranking_scores(lists: dict[str, CandidateLists], counts: np.ndarray, rng: np.random.Generator,
                   memory: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(N, L) scores of each ranking on the test lists (higher ranks first; ties keep retriever order).

    random and memorisation draw from ``rng``: memorisation puts the items a user had labelled 0 in a training
    list last and orders each group at random, so it measures memory alone, not the retriever.
    """
    test, train = lists["test"], lists["train"]
    if memory is None:  # (N, L): the same for every draw, so the audit passes it in
        memory = label_memory(train, test.user[:, None], test.items, len(counts))
    return {
        "random": rng.random(test.scores.shape),
        "retriever": test.scores,
        "reversed": -test.scores,
        "popularity": counts[test.items],
        "memorisation": -memory.astype(np.float64) + 0.5 * rng.random(test.scores.shape),
    }


# ML-100K's lists: train - valid list AUC +0.5 (popularity), +0.1 (uniform), +3.1 (retrieved); -7.3 when a
# training list could hold items the user met later; far above for lists scored in-sample (the first version:
# training-list AUC over 15 points above its test lists, tests/training/test_audit.py).
MAX_AUC_GAP = 5.0


def audit(lists: dict[str, CandidateLists], counts: np.ndarray, draws: int = 20, seed: int = 0,
          min_tolerance: float = 1.0, max_auc_gap: float = MAX_AUC_GAP) -> Audit:
    """Audit ``lists`` (train, valid, test); ``counts`` is the popularity of each item index.

    Per-list N@6 of the random rankings is averaged over ``draws`` seeded draws.
    """
    rng = np.random.default_rng(seed)
    test = lists["test"]
    per_list: dict[str, np.ndarray] = {}
    memory = label_memory(lists["train"], test.user[:, None], test.items, len(counts))
    for draw in range(draws):
        for name, scores in ranking_scores(lists, counts, rng, memory).items():
            if draw and name not in ("random", "memorisation"):
                continue
            value = metrics.ndcg_at_k(scores, test.labels, mask=test.mask)
            per_list[name] = per_list.get(name, 0.0) + (value / draws if name in ("random", "memorisation") else value)
    n6 = {name: float(per_list[name].mean() * 100) for name in RANKINGS}
    diff = per_list["memorisation"] - per_list["random"]
    tolerance = max(min_tolerance, 3 * float(diff.std(ddof=1) / np.sqrt(len(diff))) * 100)
    reasons = []
    if n6["reversed"] >= n6["retriever"]:
        reasons.append(f"reversed retriever order ({n6['reversed']:.2f}) is not below retriever order "
                       f"({n6['retriever']:.2f})")
    if n6["memorisation"] - n6["random"] > tolerance:
        reasons.append(f"memorisation ({n6['memorisation']:.2f}) beats random order ({n6['random']:.2f}) by more "
                       f"than the noise ({tolerance:.2f})")
    aucs = {split: list_auc(cl) for split, cl in lists.items()}
    if "train" in aucs and "valid" in aucs and abs(aucs["train"] - aucs["valid"]) > max_auc_gap:
        reasons.append(f"the retriever's list AUC on training lists ({aucs['train']:.2f}) is more than {max_auc_gap:g} "
                       f"points from its AUC on validation lists ({aucs['valid']:.2f}): the score means something "
                       "else on the lists a reranker learns from")
    return Audit(n6, per_list, aucs, tolerance, reasons)

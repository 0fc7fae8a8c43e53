"""Ranking metrics at k over candidate lists, computed per list and averaged.

Owns: H@k, N@k, M@k, F1@k and per-list AUC on numpy arrays. Does not know: models, torch or data files.

Every function takes ``scores`` (N, L), binary ``labels`` z (N, L) and an optional boolean ``mask``
(N, L) of real candidates. A list is ranked by descending score; equal scores keep the input order (the
retriever order), so a tie never favours a positive. Padded candidates never enter the top k.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

K = 6
METRICS = ("H@6", "N@6", "M@6", "F1@6", "AUC")


def _full_mask(labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.ones(labels.shape, dtype=bool) if mask is None else mask.astype(bool)


def topk_indices(scores: np.ndarray, k: int = K, mask: np.ndarray | None = None) -> np.ndarray:
    """(N, k) candidate positions of the k best scores, best first; stable on ties."""
    masked = np.where(_full_mask(scores, mask), scores.astype(np.float64), -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")[:, :k]


def _top_labels(scores: np.ndarray, labels: np.ndarray, k: int, mask: np.ndarray | None) -> np.ndarray:
    """(N, k) labels of the top-k candidates, padded positions counted as 0."""
    m = _full_mask(labels, mask)
    idx = topk_indices(scores, k, m)
    top = np.take_along_axis(labels * m, idx, axis=1)
    return top.astype(np.float64)


def hit_at_k(scores: np.ndarray, labels: np.ndarray, k: int = K, mask: np.ndarray | None = None) -> np.ndarray:
    """H@k = (number of positives among the top k) / k, per list."""
    return _top_labels(scores, labels, k, mask).sum(axis=1) / k


def ndcg_at_k(scores: np.ndarray, labels: np.ndarray, k: int = K, mask: np.ndarray | None = None) -> np.ndarray:
    """N@k = DCG@k / IDCG@k with DCG@k = sum_{r=1..k} (2^{z_r} - 1) / log2(r + 1), per list.

    IDCG@k is the DCG of the list sorted by label. A list without positives scores 0.
    """
    m = _full_mask(labels, mask)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = ((2.0 ** _top_labels(scores, labels, k, m) - 1.0) * discount).sum(axis=1)
    ideal = -np.sort(-(labels * m).astype(np.float64), axis=1)[:, :k]
    idcg = ((2.0**ideal - 1.0) * discount[: ideal.shape[1]]).sum(axis=1)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def map_at_k(scores: np.ndarray, labels: np.ndarray, k: int = K, mask: np.ndarray | None = None) -> np.ndarray:
    """M@k = mean over the hit ranks r <= k of precision@r = (hits in the top r) / r, per list.

    The mean runs over the hits in the top k (DESIGN section 2), so a list with no hit scores 0.
    """
    top = _top_labels(scores, labels, k, mask)
    precision = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    hits = top.sum(axis=1)
    return np.divide((precision * top).sum(axis=1), hits, out=np.zeros_like(hits), where=hits > 0)


def f1_at_k(scores: np.ndarray, labels: np.ndarray, k: int = K, mask: np.ndarray | None = None) -> np.ndarray:
    """F1@k = 2 P R / (P + R) with P = H@k and R = (positives in the top k) / (positives in the list).

    A list with no positive, or no hit, scores 0.
    """
    m = _full_mask(labels, mask)
    hits = _top_labels(scores, labels, k, m).sum(axis=1)
    positives = (labels * m).sum(axis=1).astype(np.float64)
    precision = hits / k
    recall = np.divide(hits, positives, out=np.zeros_like(hits), where=positives > 0)
    denom = precision + recall
    return np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)


def auc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-list AUC = P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from mid-ranks (Mann-Whitney U): AUC = (sum of positive ranks - P(P+1)/2) / (P N).
    NaN for a list with no positive or no negative; averages skip those lists.
    """
    m = _full_mask(labels, mask)
    z = (labels > 0) & m
    n_pos, n_neg = z.sum(axis=1), (m & ~z).sum(axis=1)
    # Padding at -inf takes the lowest ranks, so a real candidate's rank among the real ones is its rank in the
    # row minus the padding count; ties (padding's among themselves included) share their mean rank.
    ranks = rankdata(np.where(m, scores.astype(np.float64), -np.inf), method="average", axis=1)
    ranks -= (~m).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (np.where(z, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), out, np.nan)


def evaluate(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
             k: int = K) -> dict[str, float]:
    """Mean of every metric over the lists, as percentages (the paper's convention)."""
    per_list = {
        f"H@{k}": hit_at_k(scores, labels, k, mask),
        f"N@{k}": ndcg_at_k(scores, labels, k, mask),
        f"M@{k}": map_at_k(scores, labels, k, mask),
        f"F1@{k}": f1_at_k(scores, labels, k, mask),
        "AUC": auc(scores, labels, mask),
    }
    return {name: float(np.nanmean(values) * 100) for name, values in per_list.items()}

"""Metrics against lists computed by hand (numbers in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics

SCORES = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
LABELS = np.array([[1, 0, 1, 0, 0, 0, 1, 0]], dtype=float)


def test_mixed_list_by_hand() -> None:
    # Top 6 labels: 1 0 1 0 0 0 -> 2 hits of 3 positives.
    assert metrics.hit_at_k(SCORES, LABELS)[0] == pytest.approx(2 / 6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics.ndcg_at_k(SCORES, LABELS)[0] == pytest.approx((1 + 1 / math.log2(4)) / idcg)
    # Precision at hit ranks 1 and 3: 1/1 and 2/3.
    assert metrics.map_at_k(SCORES, LABELS)[0] == pytest.approx((1 + 2 / 3) / 2)
    p, r = 2 / 6, 2 / 3
    assert metrics.f1_at_k(SCORES, LABELS)[0] == pytest.approx(2 * p * r / (p + r))
    # Positive 0.9 beats 5 negatives, 0.7 beats 4, 0.3 beats 1: 10 of 15 pairs.
    assert metrics.auc(SCORES, LABELS)[0] == pytest.approx(10 / 15)


def test_ranking_uses_scores_not_input_order() -> None:
    perm = np.array([[7, 2, 5, 0, 3, 6, 1, 4]])
    shuffled_scores = np.take_along_axis(SCORES, perm, 1)
    shuffled_labels = np.take_along_axis(LABELS, perm, 1)
    assert metrics.evaluate(shuffled_scores, shuffled_labels) == pytest.approx(metrics.evaluate(SCORES, LABELS))


def test_no_positive_list() -> None:
    labels = np.zeros_like(LABELS)
    for fn in (metrics.hit_at_k, metrics.ndcg_at_k, metrics.map_at_k, metrics.f1_at_k):
        assert fn(SCORES, labels)[0] == 0.0
    assert np.isnan(metrics.auc(SCORES, labels)[0])


def test_all_positive_list() -> None:
    labels = np.ones_like(LABELS)
    assert metrics.hit_at_k(SCORES, labels)[0] == 1.0
    assert metrics.ndcg_at_k(SCORES, labels)[0] == pytest.approx(1.0)
    assert metrics.map_at_k(SCORES, labels)[0] == 1.0
    # P = 1, R = 6 / 8.
    assert metrics.f1_at_k(SCORES, labels)[0] == pytest.approx(2 * 0.75 / 1.75)
    assert np.isnan(metrics.auc(SCORES, labels)[0])


def test_ties_keep_input_order_and_count_half_in_auc() -> None:
    scores = np.full((1, 8), 0.5)
    labels = np.array([[0, 0, 0, 0, 0, 0, 1, 1]], dtype=float)
    assert metrics.hit_at_k(scores, labels)[0] == 0.0  # a tie never lifts a positive into the top 6
    assert metrics.auc(scores, labels)[0] == pytest.approx(0.5)
    # Positive 0.5 ties the negative 0.5 (1/2) and beats 0.1 (1): 1.5 of 2 pairs.
    assert metrics.auc(np.array([[0.5, 0.5, 0.1]]), np.array([[0, 1, 0]], dtype=float))[0] == pytest.approx(0.75)


def test_padding_never_counts() -> None:
    scores = np.array([[0.9, 0.95, 0.1]])
    labels = np.array([[0, 1, 1]], dtype=float)
    mask = np.array([[True, False, True]])
    assert metrics.hit_at_k(scores, labels, mask=mask)[0] == pytest.approx(1 / 6)
    assert metrics.f1_at_k(scores, labels, mask=mask)[0] == pytest.approx(2 * (1 / 6) / (1 / 6 + 1))
    assert metrics.auc(scores, labels, mask)[0] == 0.0  # the only pair: 0.1 (pos) below 0.9 (neg)
    assert list(metrics.topk_indices(scores, 3, mask)[0][:2]) == [0, 2]


def test_evaluate_averages_in_percent_and_skips_undefined_auc() -> None:
    scores = np.vstack([SCORES, SCORES])
    labels = np.vstack([LABELS, np.zeros_like(LABELS)])
    out = metrics.evaluate(scores, labels)
    assert set(out) == set(metrics.METRICS)
    assert out["H@6"] == pytest.approx(100 * (2 / 6) / 2)
    assert out["AUC"] == pytest.approx(100 * 10 / 15)

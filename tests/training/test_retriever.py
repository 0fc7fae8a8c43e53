"""MF retrievers: what each may see (pre-validation, out of fold), the fold assignment, score range."""

from __future__ import annotations

import numpy as np
import pytest

from tests.training.fixtures import Tiny
from training import data, retriever


def test_retriever_trains_only_before_validation(tiny: Tiny) -> None:
    d = tiny.dataset
    seen = retriever.seen_before_valid(d)
    for split in ("valid", "test"):
        s = d.splits[split]
        for u, start in zip(s.user[:10], s.start[:10], strict=True):
            assert len(seen[u]) <= start
    assert all(len(seen[u]) == d.splits["valid"].start[d.splits["valid"].user == u][0] for u in range(5))


def test_scores_are_probabilities(tiny: Tiny) -> None:
    for scores in (tiny.retr.pre_valid, *tiny.retr.fold_scores):
        assert scores.shape == (len(tiny.dataset.user_ids), tiny.dataset.n_items)
        s = np.asarray(scores)
        assert (s >= 0).all() and (s <= 1).all()
        assert (s[:, : data.ITEM_OFFSET] == 0).all()
    # K + 1 different fits, not one model copied.
    assert len(tiny.retr.fold_scores) == 3
    assert not np.allclose(tiny.retr.fold_scores[0], tiny.retr.fold_scores[1])
    assert not np.allclose(tiny.retr.fold_scores[0], tiny.retr.pre_valid)


def test_scores_in_blocks_hold_one_block_and_read_as_the_matrix(tiny: Tiny) -> None:
    whole = tiny.retr.pre_valid
    assert whole.block == whole.shape[0]  # small data: every user in one block, the dense matrix itself
    blocked = retriever.MFScores(whole.user, whole.item, whole.bias, block_scores=3 * whole.shape[1])
    assert blocked.block == 3
    dense = np.asarray(whole)
    np.testing.assert_allclose(np.asarray(blocked), dense, atol=1e-6)
    users, items = np.array([[7], [0], [7], [4]]), np.array([[2, 5, 9], [3, 3, 2], [0, 1, 2], [8, 2, 6]])
    np.testing.assert_allclose(blocked[users, items], dense[users, items], atol=1e-6)
    np.testing.assert_allclose(blocked[4], dense[4], atol=1e-6)
    np.testing.assert_allclose(blocked[np.array([5, 0, 5])], dense[[5, 0, 5]], atol=1e-6)  # rows of several users
    assert blocked._cached is not None and blocked._cached[1].shape == (3, whole.shape[1])  # one block held


def test_folds_are_balanced_within_each_user(tiny: Tiny) -> None:
    train, fold = tiny.dataset.splits["train"], tiny.retr.fold
    assert fold.shape == (len(train),) and set(fold.tolist()) == {0, 1, 2}
    for u in np.unique(train.user):
        counts = np.bincount(fold[train.user == u], minlength=3)
        assert counts.max() - counts.min() <= 1, (u, counts)
    # Seeded: the same assignment again, another one under another seed.
    assert np.array_equal(retriever.assign_folds(tiny.dataset, 3, 0), fold)
    assert not np.array_equal(retriever.assign_folds(tiny.dataset, 3, 1), fold)


def test_no_training_list_is_scored_by_an_mf_that_saw_its_slate(tiny: Tiny) -> None:
    d, retr = tiny.dataset, tiny.retr
    train, size = d.splits["train"], d.slate_size
    before_valid = retriever.seen_before_valid(d)
    for k in range(len(retr.fold_scores)):
        fitted_on = retriever.fold_interactions(d, retr.fold, k)
        held_out = 0
        for u, start in zip(train.user[retr.fold == k], train.start[retr.fold == k], strict=True):
            slate = d.seq_items[u][start : start + size]
            assert not np.isin(slate, fitted_on[u]).any(), f"fold {k} MF saw a slate of user {u}"
            held_out += len(slate)
        # Everything else before validation stays in: the fold MF is the pre-validation MF minus one fold.
        assert sum(map(len, before_valid)) - sum(map(len, fitted_on)) == held_out
    lists = tiny.lists["train"]
    assert np.array_equal(lists.fold, retr.fold)
    for row in range(len(lists)):
        scored_by = retr.fold_scores[lists.fold[row]]
        assert np.array_equal(lists.scores[row], scored_by[lists.user[row], lists.items[row]]), row
    for split in ("valid", "test"):
        held = tiny.lists[split]
        assert (held.fold == retriever.PRE_VALID).all()
        assert np.array_equal(held.scores, retr.pre_valid[held.user[:, None], held.items])


def test_one_fold_is_refused(tiny: Tiny) -> None:
    with pytest.raises(ValueError, match="folds 1 must be >= 2"):
        retriever.RetrieverConfig(folds=1)


def test_heldout_auc_beats_chance(tiny: Tiny) -> None:
    assert retriever.heldout_auc(tiny.dataset, tiny.retr.pre_valid) > 0.5

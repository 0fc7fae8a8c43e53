"""MF retriever and candidate lists: what the retriever may see, list composition and order."""

from __future__ import annotations

import numpy as np

from tests.conftest import Tiny
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
    s = tiny.scores
    assert s.shape == (len(tiny.dataset.user_ids), tiny.dataset.n_items)
    assert (s >= 0).all() and (s <= 1).all()
    assert (s[:, : data.ITEM_OFFSET] == 0).all()


def test_lists_hold_the_slate_and_unseen_top_items_in_retriever_order(tiny: Tiny) -> None:
    d, lists = tiny.dataset, tiny.lists
    for split, slates in d.splits.items():
        cl = lists[split]
        assert cl.items.shape == (len(slates), 30) and cl.mask.all()
        assert (np.diff(cl.scores, axis=1) <= 0).all(), "lists must be ordered by retriever score"
        for row in range(min(len(cl), 20)):
            u, start = slates.user[row], slates.start[row]
            slate = set(d.seq_items[u][start : start + 6].tolist())
            items = cl.items[row].tolist()
            assert len(set(items)) == 30 and slate <= set(items)
            others = set(items) - slate
            assert not others & set(d.seq_items[u].tolist()), "negatives must be unseen by the user"
            unseen = np.setdiff1d(np.arange(data.ITEM_OFFSET, d.n_items), d.seq_items[u])
            best_unseen = np.sort(tiny.scores[u, unseen])[::-1][:24]
            assert np.allclose(np.sort(tiny.scores[u, list(others)])[::-1], best_unseen)
            labels = dict(zip(items, cl.labels[row].tolist(), strict=True))
            for i, z in zip(d.seq_items[u][start : start + 6], d.seq_z[u][start : start + 6], strict=True):
                assert labels[int(i)] == z
            assert all(labels[i] == 0 for i in others)
            assert np.allclose(cl.scores[row], tiny.scores[u, cl.items[row]])


def test_slate_position_is_not_leaked(tiny: Tiny) -> None:
    """Slate items sit where their scores put them: on held-out lists they are not the first six."""
    test = tiny.lists["test"]
    first_six = np.isin(np.arange(30), np.arange(6))[None].repeat(len(test), 0)
    in_slate = np.zeros_like(test.mask)
    for row in range(len(test)):
        u, start = tiny.dataset.splits["test"].user[row], tiny.dataset.splits["test"].start[row]
        in_slate[row] = np.isin(test.items[row], tiny.dataset.seq_items[u][start : start + 6])
    assert (in_slate & first_six).sum() < in_slate.sum()
    assert len({tuple(np.flatnonzero(r)) for r in in_slate}) > 1


def test_heldout_auc_beats_chance(tiny: Tiny) -> None:
    assert retriever.heldout_auc(tiny.dataset, tiny.scores) > 0.5

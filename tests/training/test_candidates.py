"""Candidate lists: composition, order, negatives drawn per list, the three samplers, padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.training.fixtures import TINY_LISTS, Tiny
from training import candidates, data, retriever


def slate_of(tiny: Tiny, split: str, row: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The user, the slate, and the items no negative of its list may be: every item the user met up to and
    including the slate or before their validation slate."""
    s, valid = tiny.dataset.splits[split], tiny.dataset.splits["valid"]
    u, start = int(s.user[row]), int(s.start[row])
    size = tiny.dataset.slate_size
    valid_start = int(valid.start[valid.user == u][0])
    seq = tiny.dataset.seq_items[u]
    return u, seq[start : start + size], seq[: max(start + size, valid_start)]


@pytest.mark.parametrize("sampler", candidates.SAMPLERS)
def test_lists_hold_the_slate_and_eligible_negatives_in_retriever_order(tiny: Tiny, sampler: str) -> None:
    d = tiny.dataset
    lists = candidates.build_all_lists(d, tiny.retr, dataclasses.replace(TINY_LISTS, sampler=sampler))
    for split, slates in d.splits.items():
        cl = lists[split]
        assert cl.items.shape == (len(slates), 30) and cl.mask.all()
        assert (np.diff(cl.scores, axis=1) <= 0).all(), "lists must be ordered by retriever score"
        for row in range(len(cl)):
            u, slate, seen = slate_of(tiny, split, row)
            items = cl.items[row].tolist()
            assert len(set(items)) == 30 and set(slate.tolist()) <= set(items)
            negatives = set(items) - set(slate.tolist())
            assert not negatives & set(seen.tolist()), "a negative the user had met by then"
            labels = dict(zip(items, cl.labels[row].tolist(), strict=True))
            z = d.seq_z[u][d.splits[split].start[row] : d.splits[split].start[row] + d.slate_size]
            assert [labels[int(i)] for i in slate] == z.tolist()
            assert all(labels[i] == 0 for i in negatives)


def test_training_negatives_skip_later_choices_but_not_the_held_out_slates(tiny: Tiny) -> None:
    """A training list holds no item the user meets before validation, even after its slate (the out-of-fold MF
    saw those and ranks them high, labelled 0); it may hold the user's validation and test items, so that which
    items were a user's training negatives says nothing about their held-out labels."""
    d, train = tiny.dataset, tiny.lists["train"]
    pre_valid_later = held_out = 0
    for row in range(len(train)):
        u, _slate, excluded = slate_of(tiny, "train", row)
        negatives = set(train.items[row][train.labels[row] == 0].tolist())
        start = int(d.splits["train"].start[row]) + d.slate_size
        pre_valid_later += len(negatives & set(excluded[start:].tolist()))
        held_out += len(negatives & set(d.seq_items[u][len(excluded) :].tolist()))
    assert pre_valid_later == 0 and held_out > 0


def negative_sets(lists: candidates.CandidateLists) -> list[set[int]]:
    return [set(lists.items[r][lists.mask[r] & (lists.labels[r] == 0)].tolist()) for r in range(len(lists))]


@pytest.mark.parametrize("sampler", [s for s in candidates.SAMPLERS if s != "top"])  # top: by design, not chance
def test_two_lists_of_a_user_share_negatives_only_by_chance(tiny: Tiny, sampler: str) -> None:
    """Overlap between consecutive lists of one user ~ overlap between two independent draws for one list.

    The first version drew once per user, so every list of a user had the same negatives (overlap 24 of 24).
    """
    cfg = dataclasses.replace(TINY_LISTS, sampler=sampler)
    train = candidates.build_lists(tiny.dataset, tiny.retr, "train", cfg)
    redraw = candidates.build_lists(tiny.dataset, tiny.retr, "train", dataclasses.replace(cfg, list_seed=1))
    negs, negs_again = negative_sets(train), negative_sets(redraw)
    same_user = [len(negs[r] & negs[r + 1]) for r in range(len(train) - 1) if train.user[r] == train.user[r + 1]]
    chance = [len(a & b) for a, b in zip(negs, negs_again, strict=True)]
    n_neg = 30 - tiny.dataset.slate_size
    assert np.mean(same_user) <= 1.15 * np.mean(chance) + 0.5, (np.mean(same_user), np.mean(chance))
    assert np.mean(same_user) < 0.8 * n_neg
    # The draws are seeded: the same config gives the same lists.
    again = candidates.build_lists(tiny.dataset, tiny.retr, "train", cfg)
    assert np.array_equal(again.items, train.items)


def test_weighted_draws_follow_the_weights() -> None:
    rng = np.random.default_rng(0)
    pool, weights = np.arange(10, 15), np.array([1.0, 2.0, 4.0, 8.0, 0.0])
    first = np.array([candidates.draw(rng, pool, weights, 1)[0] for _ in range(6000)])
    share = np.bincount(first - 10, minlength=5) / len(first)
    np.testing.assert_allclose(share, weights / weights.sum(), atol=0.02)
    # Without replacement; a zero weight is drawn only when nothing else is left.
    for _ in range(50):
        four = candidates.draw(rng, pool, weights, 4)
        assert sorted(four.tolist()) == [10, 11, 12, 13]
        assert sorted(candidates.draw(rng, pool, weights, 9).tolist()) == pool.tolist()


def test_popularity_sampler_favours_popular_items(tiny: Tiny) -> None:
    counts = candidates.item_counts(tiny.dataset)
    corr = {}
    for sampler in ("uniform", "popularity"):
        lists = candidates.build_lists(tiny.dataset, tiny.retr, "train", dataclasses.replace(TINY_LISTS,
                                                                                             sampler=sampler))
        slates = [slate_of(tiny, "train", row)[1] for row in range(len(lists))]
        drawn = (np.bincount(lists.items.ravel(), minlength=len(counts))
                 - np.bincount(np.concatenate(slates), minlength=len(counts)))  # negatives only
        # How often an item is drawn as a negative, against its popularity.
        corr[sampler] = float(np.corrcoef(drawn[data.ITEM_OFFSET :], counts[data.ITEM_OFFSET :])[0, 1])
    assert corr["popularity"] > corr["uniform"] + 0.1, corr


def test_retrieved_sampler_draws_from_the_scoring_mfs_top_items(tiny: Tiny) -> None:
    cfg = dataclasses.replace(TINY_LISTS, sampler="retrieved", pool=30)
    lists = candidates.build_lists(tiny.dataset, tiny.retr, "test", cfg)
    for row in range(len(lists)):
        u, slate, seen = slate_of(tiny, "test", row)
        eligible = np.setdiff1d(np.arange(data.ITEM_OFFSET, tiny.dataset.n_items), seen)
        scores = tiny.retr.pre_valid[u]
        top = set(eligible[np.lexsort((eligible, -scores[eligible]))[:30]].tolist())
        negatives = set(lists.items[row].tolist()) - set(slate.tolist())
        assert len(negatives) == 24 and negatives <= top


def test_short_lists_are_padded_at_the_end(tiny: Tiny) -> None:
    """More candidates than eligible items: every eligible item is taken and the rest is padding."""
    cfg = dataclasses.replace(TINY_LISTS, candidates=tiny.dataset.n_items)
    test = candidates.build_lists(tiny.dataset, tiny.retr, "test", cfg)
    for row in range(len(test)):
        _, slate, seen = slate_of(tiny, "test", row)
        n_real = len(slate) + tiny.dataset.n_items - data.ITEM_OFFSET - len(set(seen.tolist()))
        assert test.mask[row].sum() == n_real and not test.mask[row, n_real:].any()
        assert (test.items[row, n_real:] == data.PAD).all() and (test.labels[row, n_real:] == 0).all()
        assert (np.diff(test.scores[row, :n_real]) <= 0).all()


def test_bad_list_settings_are_refused(tiny: Tiny) -> None:
    with pytest.raises(ValueError, match="sampler 'hard' is not one of"):
        candidates.ListConfig(sampler="hard")
    with pytest.raises(ValueError, match="smaller than the slate size"):
        candidates.build_lists(tiny.dataset, tiny.retr, "test", candidates.ListConfig(candidates=3))


def test_controlled_regime_hits_its_target_auc_and_keeps_each_list_in_score_order(tiny: Tiny) -> None:
    lists = candidates.build_all_lists(tiny.dataset, tiny.retr, TINY_LISTS)
    for target in (0.80, 0.90):
        regime, _ = candidates.controlled_lists(lists, target, sigma=1.0)
        assert candidates.list_auc(regime["train"]) == pytest.approx(target, abs=0.02)
        # The same gamma on the held-out lists lands near the target too (they are smaller, so noisier).
        for split in ("valid", "test"):
            assert candidates.list_auc(regime[split]) == pytest.approx(target, abs=0.06), split
        for split, cl in regime.items():
            assert (np.diff(cl.scores, axis=1) <= 0).all()
            before = lists[split]
            for row in range(0, len(cl), 7):  # the same candidates and labels, only re-scored and re-ordered
                assert dict(zip(cl.items[row], cl.labels[row], strict=True)) == dict(
                    zip(before.items[row], before.labels[row], strict=True))
    _, g_low = candidates.controlled_lists(lists, 0.80)
    _, g_high = candidates.controlled_lists(lists, 0.90)
    assert g_low < g_high
    with pytest.raises(ValueError, match="out of reach"):
        candidates.controlled_lists(lists, 0.95, sigma=100.0)  # noise that no gamma in range outweighs


def test_paper_protocol_scores_every_list_with_one_mf_and_takes_its_top_unseen_items(tiny: Tiny) -> None:
    d = tiny.dataset
    paper = retriever.fit_paper_retriever(d, retriever.RetrieverConfig(dim=8, epochs=2, folds=3))
    assert len(paper.fold_scores) == 1 and paper.fold_scores[0] is paper.pre_valid
    lists = candidates.build_all_lists(d, paper, dataclasses.replace(TINY_LISTS, sampler="top"))
    for split in ("train", "test"):
        cl = lists[split]
        for row in range(0, len(cl), 11):
            u = int(cl.user[row])
            slate = set(d.seq_items[u][d.splits[split].start[row] : d.splits[split].start[row] + d.slate_size])
            negatives = [int(i) for i in cl.items[row] if int(i) not in slate]
            never = np.setdiff1d(np.arange(2, d.n_items), d.seq_items[u])
            best = never[np.argsort(-paper.pre_valid[u, never], kind="stable")][: len(negatives)]
            assert set(negatives) == set(best.tolist())


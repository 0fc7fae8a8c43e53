"""The PRM backbone: shapes, masks, in-graph positions, pathways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.model import (
    MASKED_LOGIT,
    PATHWAYS,
    Dropout,
    ModelConfig,
    Reranker,
    list_standardised,
    retriever_positions,
    score_logit,
)


def make(pathway: str = "concat", seed: int = 0, score_input: str = "list") -> Reranker:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=40, item_field_sizes=[3], user_field_sizes=[4, 2], max_candidates=12,
                      history_len=5, hidden=16, heads=2, layers=1, dropout=0.0, pathway=pathway,
                      score_input=score_input)
    return Reranker(cfg, [torch.randint(0, 4, (40, 2))]).eval()


def inputs(b: int = 3, n: int = 12) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    items = torch.randint(2, 40, (b, n), generator=g)
    scores = torch.rand(b, n, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    history = torch.randint(0, 40, (b, 5), generator=g)
    profile = torch.stack([torch.randint(0, 5, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)], 1)
    return items, scores, mask, history, profile


def test_positions_rank_by_score_with_padding_last_and_ties_by_index() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.5, 0.5, 0.99]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert retriever_positions(scores, mask).tolist() == [[3, 0, 1, 2, 4]]


@pytest.mark.parametrize("pathway", PATHWAYS)
def test_candidate_order_does_not_matter(pathway: str) -> None:
    """Positions come from the scores, so permuting the candidates permutes the logits."""
    model = make(pathway)
    items, scores, mask, history, profile = inputs()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(items, scores, mask, history, profile)
        shuffled = model(items[:, perm], scores[:, perm], mask[:, perm], history, profile)
    assert torch.allclose(base[:, perm], shuffled, atol=1e-5)


def test_padding_neither_scores_nor_affects_real_candidates() -> None:
    model = make()
    items, scores, mask, history, profile = inputs()
    mask[:, 8:] = False
    with torch.no_grad():
        full = model(items, scores, mask, history, profile)
        short = model(items[:, :8], scores[:, :8], mask[:, :8], history, profile)
        other = model(items.clone().index_fill_(1, torch.arange(8, 12), 7), scores, mask, history, profile)
    assert (full[:, 8:] == MASKED_LOGIT).all()
    assert torch.allclose(full[:, :8], short, atol=1e-5)
    assert torch.allclose(full[:, :8], other[:, :8], atol=1e-5)


def test_score_pathway_uses_the_score_and_none_ignores_it() -> None:
    items, scores, mask, history, profile = inputs()
    order_kept = scores * 0.5  # same ranking, different values
    with torch.no_grad():
        none = make("none")
        assert torch.allclose(none(items, scores, mask, history, profile),
                              none(items, order_kept, mask, history, profile))
        concat = make("concat")
        assert not torch.allclose(concat(items, scores, mask, history, profile),
                                  concat(items, order_kept, mask, history, profile))


def test_empty_history_and_unknown_profile_are_finite() -> None:
    model = make()
    items, scores, mask, history, profile = inputs()
    with torch.no_grad():
        out = model(items, scores, mask, torch.zeros_like(history), torch.zeros_like(profile))
    assert torch.isfinite(out).all()


def test_frozen_item_table_matches_the_live_one() -> None:
    model = make()
    args = inputs()
    with torch.no_grad():
        live = model(*args)
        frozen = model.freeze()(*args)
    assert torch.allclose(live, frozen)


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="pathway 'sum'"):
        ModelConfig(n_items=3, pathway="sum")
    with pytest.raises(ValueError, match="hidden 10 is not divisible by heads 4"):
        ModelConfig(n_items=3, hidden=10, heads=4)
    with pytest.raises(ValueError, match="score_input 'rank'"):
        ModelConfig(n_items=3, score_input="rank")
    with pytest.raises(ValueError, match=r"score_dropout 1.5 is not in \[0, 1\)"):
        ModelConfig(n_items=3, score_dropout=1.5)


def test_list_standardised_scores_are_centred_scaled_and_zero_on_padding() -> None:
    x = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    z = list_standardised(x, mask)
    assert torch.allclose(z[0, :3], torch.tensor([1.0, -1.0, 0.0]) * 1.5**0.5, atol=1e-4)
    assert torch.equal(z[:, 3], torch.zeros(2)) and torch.allclose(z[1], torch.zeros(4))  # one value: all 0


@pytest.mark.parametrize("pathway", ["concat", "add", "weight", "residual", "late"])
def test_list_score_input_ignores_the_retriever_calibration(pathway: str) -> None:
    """Scores recalibrated by any increasing affine map of their logit (what a retrained retriever does) give the
    same logits under score_input list, and different ones under raw."""
    items, scores, mask, history, profile = inputs()
    shifted = torch.sigmoid(0.5 * score_logit(scores) - 1.0)
    positions = retriever_positions(scores, mask)
    for score_input, same in (("list", True), ("raw", False)):
        model = make(pathway, score_input=score_input)
        if pathway == "residual":  # the untrained correction is 0: give it weight so the features reach it
            torch.nn.init.normal_(model.head[-1].weight)
        with torch.no_grad():
            a = model(items, scores, mask, history, profile, positions)
            b = model(items, shifted, mask, history, profile, positions)
        assert torch.allclose(a, b, atol=1e-4) == same, (pathway, score_input)


def test_untrained_residual_model_is_the_retriever_order() -> None:
    items, scores, mask, history, profile = inputs()
    with torch.no_grad():
        logits = make("residual")(items, scores, mask, history, profile)
    assert torch.equal(logits.argsort(-1, descending=True), scores.argsort(-1, descending=True))


@pytest.mark.parametrize("pathway", ["none", "residual", "late"])
def test_late_pathways_encode_without_the_score(pathway: str) -> None:
    model = make(pathway)
    items, scores, mask, history, profile = inputs()
    positions = retriever_positions(scores, mask)
    other = torch.rand_like(scores)
    with torch.no_grad():
        h = model.encode(items, scores, mask, history, profile, positions)
        assert torch.equal(h, model.encode(items, other, mask, history, profile, positions))
        # ... and the whole model is the encoder then the score head, which reads the score where it should.
        assert torch.equal(model(items, scores, mask, history, profile, positions), model.score_logits(h, scores, mask))
        moved = not torch.allclose(model.score_logits(h, scores, mask), model.score_logits(h, other, mask))
    assert model.late_score and moved == (pathway != "none")
    assert not make("weight").late_score


@pytest.mark.parametrize("switch", ["positions", "history", "side_features"])
def test_ablation_switches_make_the_model_blind_to_their_input(switch: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=40, item_field_sizes=[3], user_field_sizes=[4, 2], max_candidates=12, history_len=5,
                      hidden=16, heads=2, layers=1, dropout=0.0, pathway="late", **{switch: False})
    tokens = [torch.randint(0, 4, (40, 2))]
    model, full = Reranker(cfg, tokens).eval(), Reranker(dataclasses.replace(cfg, **{switch: True}), tokens).eval()
    items, scores, mask, history, profile = inputs()
    positions = retriever_positions(scores, mask)
    changed = {"positions": (items, scores, mask, history, profile, positions.flip(-1)),
               "history": (items, scores, mask, history.flip(-1) % 40, profile, positions),
               "side_features": (items, scores, mask, history, (profile + 1) % 3, positions)}[switch]
    with torch.no_grad():
        assert torch.equal(model(items, scores, mask, history, profile, positions), model(*changed))
        full.load_state_dict(model.state_dict())
        assert not torch.equal(full(items, scores, mask, history, profile, positions), full(*changed))


def test_byte_dropout_drops_p_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(400, 250)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - 77 / 256)) < 0.005 and abs(y.mean().item() - 1.0) < 0.01
    assert torch.allclose(torch.unique(y), torch.tensor([0.0, 256 / 179]))
    assert not torch.equal(drop(x), y)  # a fresh mask each call
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)

"""DNR: synthetic scores, the generators, the two alternating steps and a short run on the tiny data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.training_fixtures import Tiny
from training import generator, metrics
from training.train import (
    VARIANTS,
    TrainConfig,
    build_model,
    generator_step,
    list_positions,
    masked_bce,
    model_noise,
    predict,
    reranker_step,
    seed_everything,
    to_tensors,
    train,
)


def test_synthetic_scores_follow_the_formula_and_stay_in_range() -> None:
    z = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    eps = torch.tensor([[0.0, 0.0, 1.0, 0.25]])
    x = generator.synthetic_scores(z, eps, lambda_c=0.4)
    torch.testing.assert_close(x, torch.tensor([[0.0, 0.6, 0.4, 0.7]]))
    # lambda_c = 0 is the label itself, 1 the noise itself.
    torch.testing.assert_close(generator.synthetic_scores(z, eps, 0.0), z)
    torch.testing.assert_close(generator.synthetic_scores(z, eps, 1.0), eps)
    # Unbounded Gaussian noise is clipped to the retriever's [0, 1].
    wild = generator.synthetic_scores(z.expand(1000, 4), 10 * torch.randn(1000, 4), 0.4)
    assert wild.min() >= 0.0 and wild.max() <= 1.0 and (wild == 0.0).any() and (wild == 1.0).any()


@pytest.mark.parametrize(("kind", "params"), [("gaussian", {}), ("beta", {}), ("beta", {"alpha": 2.0, "beta": 5.0})])
def test_heuristic_noise_gives_scores_in_range(kind: str, params: dict[str, float]) -> None:
    torch.manual_seed(0)
    eps = generator.HeuristicNoise(kind, **params).sample((200, 50))
    assert eps.shape == (200, 50) and torch.isfinite(eps).all()
    if kind == "beta":
        assert eps.min() >= 0.0 and eps.max() <= 1.0
        mean = params.get("alpha", 0.5) / (params.get("alpha", 0.5) + params.get("beta", 0.5))
        assert float(eps.mean()) == pytest.approx(mean, abs=0.02)
    x = generator.synthetic_scores(torch.randint(0, 2, (200, 50)).float(), eps, 0.4)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_gaussian_noise_clip_choice() -> None:
    torch.manual_seed(0)
    raw = generator.HeuristicNoise("gaussian", sigma=2.0).sample((1000,))
    clipped = generator.HeuristicNoise("gaussian", sigma=2.0, clip_noise=True).sample((1000,))
    assert raw.min() < 0.0 and raw.max() > 1.0
    assert clipped.min() == 0.0 and clipped.max() == 1.0


def test_unconditioned_generator_ignores_user_and_candidate() -> None:
    gen = generator.NoiseGenerator(dim=16, hidden=8, conditioned=False)
    z, user, cands = torch.randint(0, 2, (2, 30)).float(), torch.randn(2, 16), torch.randn(2, 30, 16)
    torch.manual_seed(1)
    a = gen(user, cands, z)
    torch.manual_seed(1)
    b = gen(torch.zeros(2, 16), torch.zeros(2, 30, 16), z)
    torch.testing.assert_close(a, b)


def test_heuristic_noise_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="uniform"):
        generator.HeuristicNoise("uniform")
    with pytest.raises(ValueError, match="sigma"):
        generator.HeuristicNoise("gaussian", sigma=0.0)


def test_model_generator_output_is_in_unit_interval_even_for_extreme_inputs() -> None:
    torch.manual_seed(0)
    gen = generator.NoiseGenerator(dim=16, hidden=8)
    with torch.no_grad():
        for layer in gen.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(100.0)
    user, cands = 1e3 * torch.randn(4, 16), 1e3 * torch.randn(4, 30, 16)
    eps = gen(user, cands, torch.randint(0, 2, (4, 30)).float())
    assert eps.shape == (4, 30) and eps.min() >= 0.0 and eps.max() <= 1.0
    # The random input makes eps a distribution: two draws for the same inputs differ.
    fresh = generator.NoiseGenerator(dim=16, hidden=8)
    user, cands, z = torch.randn(1, 16), torch.randn(1, 30, 16), torch.zeros(1, 30)
    assert not torch.equal(fresh(user, cands, z), fresh(user, cands, z))


def test_distribution_loss_is_zero_for_equal_samples_and_grows_with_the_gap() -> None:
    real = torch.rand(8, 30)
    mask = torch.ones(8, 30, dtype=torch.bool)
    for estimator in generator.LX_ESTIMATORS:
        same = generator.distribution_loss(real.clone(), real, mask, estimator)
        near = generator.distribution_loss((real + 0.05).clamp(0, 1), real, mask, estimator)
        far = generator.distribution_loss(torch.zeros(8, 30), real, mask, estimator)
        assert float(same) == pytest.approx(0.0, abs=1e-6), estimator
        assert 0.0 < float(near) < float(far), estimator
    with pytest.raises(ValueError, match="l2"):
        generator.distribution_loss(real, real, mask, "l2")


@dataclasses.dataclass
class Parts:
    cfg: TrainConfig
    model: torch.nn.Module
    gen: generator.NoiseGenerator
    batch: dict[str, torch.Tensor]


@pytest.fixture
def parts(tiny: Tiny) -> Parts:
    cfg = dataclasses.replace(tiny.cfg, variant="dnr-g", dropout=0.0)
    seed_everything(0, 1)
    model = build_model(tiny.dataset, cfg, tiny.lists["train"].items.shape[1])
    model.train()
    gen = generator.NoiseGenerator(cfg.hidden, cfg.gen_hidden)
    return Parts(cfg, model, gen, to_tensors(tiny.lists["train"], np.arange(64)))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v)]


def test_reranker_step_moves_no_generator_parameter(parts: Parts) -> None:
    opt = torch.optim.AdamW(parts.model.parameters(), lr=1e-2)
    rer, gen = snapshot(parts.model), snapshot(parts.gen)
    eps = model_noise(parts.model, parts.gen, parts.batch)
    logs, _ = reranker_step(parts.model, opt, parts.batch, eps, parts.cfg)
    assert set(logs) == {"L_direct", "L_z"} and all(np.isfinite(v) for v in logs.values())
    assert not changed(gen, parts.gen)
    assert all(p.grad is None for p in parts.gen.parameters())
    assert "head.2.weight" in changed(rer, parts.model) and "score_mlp.0.weight" in changed(rer, parts.model)


@pytest.mark.parametrize("variant", ["dnr-g", "dnr-g-no-adv", "dnr-g-no-x"])
def test_generator_step_moves_no_reranker_parameter(parts: Parts, variant: str) -> None:
    cfg = dataclasses.replace(parts.cfg, variant=variant)
    opt = torch.optim.Adam(parts.gen.parameters(), lr=1e-2)
    rer, gen = snapshot(parts.model), snapshot(parts.gen)
    logs = generator_step(parts.model, parts.gen, opt, parts.batch, cfg)
    expected = ({"L_adv"} if VARIANTS[variant].adv else set()) | ({"L_x"} if VARIANTS[variant].lx else set())
    assert set(logs) == expected and all(np.isfinite(v) for v in logs.values())
    assert not changed(rer, parts.model)
    assert all(p.grad is None or not p.grad.any() for p in parts.model.parameters())
    assert all(p.requires_grad for p in parts.model.parameters()), "the reranker must be unfrozen afterwards"
    assert parts.model.training, "the reranker's mode must be restored"
    assert set(changed(gen, parts.gen)) == {k for k, _ in parts.gen.named_parameters()}


def test_each_loss_has_gradients_exactly_where_intended(parts: Parts) -> None:
    t, cfg = parts.batch, parts.cfg
    positions = list_positions(len(t["items"]), t["items"].shape[1])

    def grads(loss: torch.Tensor) -> tuple[bool, bool]:
        parts.model.zero_grad()
        parts.gen.zero_grad()
        assert torch.isfinite(loss)
        loss.backward()
        has = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
               for m in (parts.model, parts.gen)]
        return has[0], has[1]

    direct = masked_bce(parts.model(t["items"], t["scores"], t["mask"], t["history"], t["profile"], positions),
                        t["labels"], t["mask"])
    assert grads(direct) == (True, False)
    x_syn = generator.synthetic_scores(t["labels"], model_noise(parts.model, parts.gen, t).detach(), cfg.lambda_c)
    l_z = masked_bce(parts.model(t["items"], x_syn, t["mask"], t["history"], t["profile"], positions),
                     t["labels"], t["mask"])
    assert grads(l_z) == (True, False)
    parts.model.requires_grad_(False)
    x_gen = generator.synthetic_scores(t["labels"], model_noise(parts.model, parts.gen, t), cfg.lambda_c)
    l_adv = generator.adversarial_loss(
        parts.model(t["items"], x_gen, t["mask"], t["history"], t["profile"], positions), t["labels"], t["mask"])
    assert float(l_adv.detach()) < 0.0
    assert grads(l_adv) == (False, True)
    for estimator in generator.LX_ESTIMATORS:
        x_gen = generator.synthetic_scores(t["labels"], model_noise(parts.model, parts.gen, t), cfg.lambda_c)
        assert grads(generator.distribution_loss(x_gen, t["scores"], t["mask"], estimator)) == (False, True)
    parts.model.requires_grad_(True)


def test_short_dnr_run_beats_its_initialisation_and_trains_the_generator(tiny: Tiny) -> None:
    cfg = dataclasses.replace(tiny.cfg, variant="dnr-b", epochs=4, lambda_e=1, patience=1)
    result = train(tiny.dataset, tiny.lists, cfg, progress=False)
    valid = tiny.lists["valid"]
    seed_everything(cfg.seed, cfg.threads)
    init = build_model(tiny.dataset, cfg, valid.items.shape[1])
    before = metrics.evaluate(predict(init, valid), valid.labels, valid.mask)["N@6"]
    assert result.best_valid["N@6"] > before
    # Early stopping waits for the generator: epochs 2.. ran with it and logged its losses.
    assert len(result.epochs) >= cfg.lambda_e + cfg.patience
    assert "L_adv" in result.epochs[-1] and "L_x" in result.epochs[-1] and "L_z" in result.epochs[-1]
    assert "L_adv" not in result.epochs[0]
    assert result.generator is not None and result.synthetic is not None
    assert result.synthetic.min() >= 0.0 and result.synthetic.max() <= 1.0
    assert result.synthetic.size == int(valid.mask.sum())


def test_unknown_dnr_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="dnr_pathway"):
        TrainConfig(variant="dnr-g", dnr_pathway="multiply")
    with pytest.raises(ValueError, match="lx_estimator"):
        TrainConfig(variant="dnr-g", lx_estimator="mmd")
    with pytest.raises(ValueError, match="lambda_c"):
        TrainConfig(variant="dnr-g", lambda_c=1.5)


@pytest.mark.parametrize("pathway", ["late", "residual"])
def test_late_pathway_dnr_steps_share_one_encoder_pass(tiny: Tiny, pathway: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dataclasses.replace(tiny.cfg, variant="dnr-g", dnr_pathway=pathway, dropout=0.0)
    seed_everything(0, 1)
    model = build_model(tiny.dataset, cfg, tiny.lists["train"].items.shape[1]).train()
    gen = generator.NoiseGenerator(cfg.hidden, cfg.gen_hidden)
    batch = to_tensors(tiny.lists["train"], np.arange(64))
    passes: list[bool] = []  # one entry per encoder pass: whether it built a graph
    encode = model.encode_with_state
    monkeypatch.setattr(model, "encode_with_state", lambda *a: passes.append(torch.is_grad_enabled()) or encode(*a))
    rer, gens = snapshot(model), snapshot(gen)
    # The generator's eps comes from the reranker step's own user state and candidates: one pass for all three.
    logs, encoding = reranker_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, None, cfg, gen)
    assert passes == [True] and set(logs) == {"L_direct", "L_z"}
    assert changed(rer, model) and not changed(gens, gen)
    assert not encoding.h.requires_grad and encoding.h.shape == (64, batch["items"].shape[1], cfg.hidden)
    rer = snapshot(model)
    logs = generator_step(model, gen, torch.optim.Adam(gen.parameters(), lr=1e-2), batch, cfg, encoding)
    assert passes == [True] and set(logs) == {"L_adv", "L_x"}  # the step's encoding serves the generator too
    assert not changed(rer, model) and set(changed(gens, gen)) == {k for k, _ in gen.named_parameters()}
    # Without the step's encoding the frozen encoder runs again, without a graph.
    logs = generator_step(model, gen, torch.optim.Adam(gen.parameters(), lr=1e-2), batch, cfg)
    assert passes == [True, False] and not changed(rer, model)

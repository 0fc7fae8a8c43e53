"""DNR: synthetic scores, the generators, the two alternating steps and a short run on the tiny data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.training.fixtures import Tiny
from training import generator, metrics
from training.train import (
    VARIANTS,
    Batch,
    TrainConfig,
    build_model,
    fit_calibration,
    generator_step,
    masked_bce,
    model_noise,
    predict,
    reranker_step,
    seed_everything,
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
    batch: Batch


@pytest.fixture
def parts(tiny: Tiny) -> Parts:
    cfg = dataclasses.replace(tiny.cfg, variant="dnr-g", dropout=0.0)
    seed_everything(0, 1)
    model = build_model(tiny.dataset, cfg, tiny.lists["train"].items.shape[1])
    model.train()
    gen = generator.NoiseGenerator(cfg.hidden, cfg.gen_hidden)
    return Parts(cfg, model, gen, Batch.of(tiny.lists["train"], np.arange(64)))


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
    # Both losses read x' through the list-standardised logit, which a shift of the output layer's bias changes
    # only where the logit's clamp binds: that bias may or may not move.
    moved = set(changed(gen, parts.gen))
    assert moved >= {k for k, _ in parts.gen.named_parameters()} - {"net.2.bias"}


def test_each_loss_has_gradients_exactly_where_intended(parts: Parts) -> None:
    t, cfg = parts.batch, parts.cfg

    def grads(loss: torch.Tensor) -> tuple[bool, bool]:
        parts.model.zero_grad()
        parts.gen.zero_grad()
        assert torch.isfinite(loss)
        loss.backward()
        has = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
               for m in (parts.model, parts.gen)]
        return has[0], has[1]

    direct = masked_bce(t.logits(parts.model),
                        t.labels, t.mask)
    assert grads(direct) == (True, False)
    x_syn = generator.synthetic_scores(t.labels, model_noise(parts.model, parts.gen, t).detach(), cfg.lambda_c)
    l_z = masked_bce(t.logits(parts.model, x_syn),
                     t.labels, t.mask)
    assert grads(l_z) == (True, False)
    parts.model.requires_grad_(False)
    x_gen = generator.synthetic_scores(t.labels, model_noise(parts.model, parts.gen, t), cfg.lambda_c)
    l_adv = generator.adversarial_loss(
        t.logits(parts.model, x_gen), t.labels, t.mask)
    assert float(l_adv.detach()) < 0.0
    assert grads(l_adv) == (False, True)
    for estimator in generator.LX_ESTIMATORS:
        x_gen = generator.synthetic_scores(t.labels, model_noise(parts.model, parts.gen, t), cfg.lambda_c)
        assert grads(generator.distribution_loss(x_gen, t.scores, t.mask, estimator)) == (False, True)
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
def test_late_pathway_steps_share_one_encoder_pass_and_the_generator_faces_the_eval_reranker(
        tiny: Tiny, pathway: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dataclasses.replace(tiny.cfg, variant="dnr-g", dnr_pathway=pathway, dropout=0.0)
    seed_everything(0, 1)
    model = build_model(tiny.dataset, cfg, tiny.lists["train"].items.shape[1]).train()
    gen = generator.NoiseGenerator(cfg.hidden, cfg.gen_hidden)
    batch = Batch.of(tiny.lists["train"], np.arange(64))
    passes: list[tuple[bool, bool]] = []  # one entry per encoder pass: (built a graph, in training mode)
    encode = model.encode_with_state
    monkeypatch.setattr(model, "encode_with_state",
                        lambda *a: passes.append((torch.is_grad_enabled(), model.training)) or encode(*a))
    rer, gens = snapshot(model), snapshot(gen)
    # The reranker step draws x' from the generator on its own user state and candidates: one pass for both.
    logs, encoding = reranker_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batch, None, cfg, gen)
    assert passes == [(True, True)] and set(logs) == {"L_direct", "L_z"}
    assert changed(rer, model) and not changed(gens, gen)
    assert not encoding.h.requires_grad and encoding.h.shape == (64, batch.items.shape[1], cfg.hidden)
    # Warm-up (before lambda_e): L_x alone, from the step's encoding, with no reranker pass at all.
    rer = snapshot(model)
    calibration = fit_calibration(model, tiny.lists["train"])
    logs = generator_step(model, gen, torch.optim.Adam(gen.parameters(), lr=1e-2), batch, cfg, calibration,
                          encoding, adversarial=False)
    assert passes == [(True, True)] and set(logs) == {"L_x"}
    # The adversarial step (Algorithm 1, line 6) faces the frozen reranker in eval mode: one pass, no graph.
    logs = generator_step(model, gen, torch.optim.Adam(gen.parameters(), lr=1e-2), batch, cfg, calibration, encoding)
    assert passes == [(True, True), (False, False)] and set(logs) == {"L_adv", "L_x"}
    assert not changed(rer, model)
    assert set(changed(gens, gen)) >= {k for k, _ in gen.named_parameters()} - {"net.2.bias"}  # see above
    assert model.training


def test_matched_noise_reproduces_each_labels_score_distribution() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 50)) < 0.1).astype(np.float32)
    scores = np.where(labels > 0, rng.beta(3.0, 2.0, labels.shape), rng.beta(1.0, 6.0, labels.shape)).astype(np.float32)
    mask = np.ones_like(labels, dtype=bool)
    (a0, b0), (a1, b1) = generator.HeuristicNoise.fit_matched(scores, labels, mask)
    assert a0 == pytest.approx(1.0, rel=0.1) and b0 == pytest.approx(6.0, rel=0.1)
    assert a1 == pytest.approx(3.0, rel=0.2) and b1 == pytest.approx(2.0, rel=0.2)
    torch.manual_seed(0)
    noise = generator.HeuristicNoise("matched", matched=((a0, b0), (a1, b1)))
    x = noise.synthetic(torch.from_numpy(labels), lambda_c=0.4).numpy()  # lambda_c plays no part
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x[labels > 0].mean() == pytest.approx(0.6, abs=0.02)
    assert x[labels == 0].mean() == pytest.approx(1 / 7, abs=0.01)
    # As informative as the real scores: the same list AUC within noise; the paper's heuristic is far cleaner.
    real, matched = np.nanmean(metrics.auc(scores, labels)), np.nanmean(metrics.auc(x, labels))
    assert matched == pytest.approx(real, abs=0.02)
    beta = generator.HeuristicNoise("beta").synthetic(torch.from_numpy(labels), 0.4).numpy()
    assert np.nanmean(metrics.auc(beta, labels)) == 1.0
    with pytest.raises(ValueError, match="matched"):
        generator.HeuristicNoise("matched")


def test_calibration_recovers_a_logistic_law_and_makes_an_inverted_score_earn_nothing() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=20000)
    z = (rng.random(20000) < 1 / (1 + np.exp(-(-2.0 + 1.5 * f)))).astype(np.float64)
    cal = generator.Calibration.fit(f, z)
    assert cal.a == pytest.approx(-2.0, abs=0.1) and cal.b == pytest.approx(1.5, abs=0.1)
    # A reranker that trusts the score as the calibration does: on an inverted score, Eq. 7 (log q alone) pays
    # the generator a large reward; Eq. 5 (log q - log p) pays nothing, because p is fooled just as much.
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    inverted = torch.tensor([[-2.0, 1.0, 1.5, 0.5]])
    q = cal.logits(inverted)
    assert float(generator.adversarial_loss(q, labels, mask)) < -1.0
    assert float(generator.adversarial_loss(q, labels, mask, cal.logits(inverted))) == pytest.approx(0.0, abs=1e-6)


def test_the_learned_generator_makes_harder_scores_than_the_heuristic_and_keeps_the_real_informativeness(
        tiny: Tiny) -> None:
    cfg = dataclasses.replace(tiny.cfg, variant="dnr-b", dnr_pathway="late", epochs=6, lambda_e=2, patience=6,
                              lx_conditional=True)
    result = train(tiny.dataset, tiny.lists, cfg, progress=False)
    valid = tiny.lists["valid"]
    heuristic = [e["xprime_auc"] for e in result.epochs if e["epoch"] <= cfg.switch_epoch]
    learned = [e["xprime_auc"] for e in result.epochs if e["epoch"] > cfg.switch_epoch]
    assert heuristic and learned and all(a == pytest.approx(100.0) for a in heuristic)  # Beta(0.5, 0.5) at 0.4
    # The adversarial step has something to push: x' is harder to read than the heuristic's, and L_x per label
    # keeps it near what the real scores tell of the label (their list AUC), not beyond it in either direction.
    real = result.epochs[0]["x_auc"]
    assert max(learned) < 99.0
    assert all(abs(a - real) < 10.0 for a in learned), (learned, real)
    assert result.synthetic is not None and result.synthetic_z is not None
    assert result.synthetic.size == result.synthetic_z.size == int(valid.mask.sum())

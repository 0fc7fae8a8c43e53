"""Training the reranker on candidate lists: BCE, DNR's synthetic scores and generator, early stopping on
validation N@6, fixed seeds.

Owns: the named variants, the training loop (reranker step, generator step), batching of ``CandidateLists``
into tensors, prediction, reproducibility. Does not know: data files, the retriever's internals or ONNX.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import distributed, generator, metrics
from training.candidates import CandidateLists
from training.data import Dataset
from training.model import PATHWAYS, ModelConfig, Reranker


@dataclass(frozen=True)
class Variant:
    """What a named variant trains: its score pathway and, for DNR, how it makes synthetic scores."""

    pathway: str | None  # None: TrainConfig.dnr_pathway
    noise: str | None = None  # heuristic noise (gaussian / beta / matched); None: no synthetic scores, plain BCE
    generator: bool = False  # after lambda_e epochs x' comes from the model-based generator
    adv: bool = True  # the generator's loss has L_adv
    lx: bool = True  # the generator's loss has L_x
    calibrated: bool = True  # L_adv = log q - log p(z | x') (Eq. 5); False: log q alone (Eq. 7)
    without: str | None = None  # an ablation: the input the model does not read (positions, history, side_features)

    @property
    def synthetic(self) -> bool:
        return self.noise is not None


VARIANTS = {
    "prm": Variant("none"),
    "prm-concat": Variant("concat"),
    "prm-add": Variant("add"),
    "prm-weight": Variant("weight"),
    "prm-residual": Variant("residual"),
    "prm-late": Variant("late"),
    # What PRM learns from, each ablated alone (the score pathway's ablation is prm against the prm-* pathways).
    "prm-no-positions": Variant("none", without="positions"),
    "prm-no-history": Variant("none", without="history"),
    "prm-no-side-features": Variant("none", without="side_features"),
    "g": Variant(None, "gaussian"),  # heuristic-only: L_direct + lambda_m L_z with Gaussian eps throughout
    "b": Variant(None, "beta"),
    "m": Variant(None, "matched"),  # heuristic-only with x' | z fitted to the real scores of each label
    "dnr-g": Variant(None, "gaussian", generator=True),
    "dnr-b": Variant(None, "beta", generator=True),
    "dnr-m": Variant(None, "matched", generator=True),
    "dnr-b-eq7": Variant(None, "beta", generator=True, calibrated=False),  # the paper's L_adv approximation
    "dnr-g-no-adv": Variant(None, "gaussian", generator=True, adv=False),
    "dnr-g-no-x": Variant(None, "gaussian", generator=True, lx=False),
    "dnr-b-no-adv": Variant(None, "beta", generator=True, adv=False),
    "dnr-b-no-x": Variant(None, "beta", generator=True, lx=False),
}


SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    variant: str = field(default="prm", metadata={"help": f"reranker variant: {', '.join(VARIANTS)}"})
    # Batch 64, at most 20 epochs, patience 4 ("trained until convergence"). At batch 512 a run took 27 steps an
    # epoch: every variant was still rising at epoch 10, and prm-late sat at the retriever order's level (validation
    # N@6 37.0) for its first 5 epochs. On ML-100K (seed 0, one thread each) prm-late's validation N@6 at epoch 5:
    # 37.0 at batch 512, 41.0 at 128, 42.3 at 64, for the same ~8-9 s an epoch; at 64 it levels off near 44.5 by
    # epoch 12-15.
    epochs: int = field(default=20, metadata={"help": "maximum training epochs"})
    patience: int = field(default=4, metadata={"help": "epochs without a better validation N@6 before stopping"})
    batch_size: int = field(default=64, metadata={"help": "lists per batch (paper: 2048 on ML-1M)"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate"})
    schedule: str = field(default="constant", metadata={
        "help": "learning-rate schedule after the warm-up: constant, or cosine (decay to lr_min x lr at the last "
                "epoch)"})
    # A linear warm-up for both schedules: at a constant 1e-2 from the first step some seeds of score-reading
    # variants kept epoch 1 and never left the retriever order's level.
    warmup: float = field(default=1.0, metadata={"help": "epochs of linear learning-rate warm-up"})
    lr_min: float = field(default=0.05, metadata={"help": "cosine schedule: final learning rate, as a fraction of lr"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay (paper: 1e-3)"})
    # 64 / 1 layer rather than the paper's 128 / 2: ~7.5 s instead of ~26 s an epoch on 2 cores, and on
    # ML-100K one seed of each reached the same validation N@6 in a 12-epoch probe (README, deviations).
    hidden: int = field(default=64, metadata={"help": "hidden size (paper: 128)"})
    heads: int = field(default=2, metadata={"help": "attention heads"})
    layers: int = field(default=1, metadata={"help": "transformer layers over the candidates (paper size: 2)"})
    dropout: float = field(default=0.3, metadata={"help": "dropout (paper: 0.3)"})
    score_input: str = field(default="list", metadata={
        "help": "what a score pathway reads: raw (the score) or list (its logit standardised within the list)"})
    # 0.5: on ML-100K (seed 0, 10 epochs) prm-late's validation N@6 went from 39.1 to 42.2 and prm-add's stayed
    # at 41.3; without it a model that reads the score sits at the retriever's level for epochs.
    score_dropout: float = field(default=0.5, metadata={
        "help": "training only: share of lists whose real score feature is blanked, so the encoder cannot lean on "
                "it (DNR's synthetic scores are never blanked)"})
    positions: bool = field(default=True, metadata={"help": "position embedding over the retriever order"})
    history: bool = field(default=True, metadata={"help": "history encoder (else the profile alone)"})
    side_features: bool = field(default=True, metadata={"help": "item side features and the user profile"})
    seed: int = field(default=0, metadata={"help": "reranker seed"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    device: str = field(default="auto", metadata={
        "help": "where training runs: cpu, cuda, or auto (cuda when torch sees a GPU)"})
    # DNR (variants g, b, m, dnr-*). Paper values are for ML-1M; see reports/ml100k.md for what we chose here.
    # late: the paper's fusion point, and the one where a single encoder pass serves the real scores and the
    # synthetic ones.
    dnr_pathway: str = field(default="late", metadata={"help": "score pathway of the g, b, m and dnr-* variants"})
    lambda_c: float = field(default=0.4, metadata={
        "help": "heuristic generators: x' = (1 - lambda_c) z + lambda_c eps (paper: 0.4)"})
    gen_lambda_c: float = field(default=1.0, metadata={
        "help": "model-based generator: x' = (1 - gen_lambda_c) z + gen_lambda_c eps (paper, section 3.3: 1)"})
    lambda_m: float = field(default=0.4, metadata={"help": "weight of L_z, the BCE on synthetic scores (paper: 0.4)"})
    lambda_e: float = field(default=0.4, metadata={
        "help": "heuristic noise before the model-based generator starts: epochs, or below 1 a share of --epochs "
                "(paper: 40 epochs on ML-1M)"})
    lambda_x: float = field(default=1.0, metadata={"help": "weight of L_x in the generator's loss"})
    lx_estimator: str = field(default="kl", metadata={
        "help": "L_x: kl (soft-histogram KL(synthetic || real)) or w1 (1-Wasserstein), on the score feature the "
                "reranker reads"})
    # Per label: on ML-100K (dnr-m, seed 0, batch 64) the marginal L_x let the calibrated L_adv make x' easier than
    # the real scores (list AUC 88 against 79, validation N@6 44.3); per label x' stayed a little harder than the
    # real scores (AUC 75-78, N@6 44.9). Eq. 7's L_adv with the marginal L_x inverted x' (AUC 28-47).
    lx_conditional: bool = field(default=True, metadata={
        "help": "L_x per label (x' | z against the real x | z, summed); --no-lx-conditional: the marginal (the "
                "paper's)"})
    noise_mu: float = field(default=0.5, metadata={"help": "Gaussian eps mean"})
    noise_sigma: float = field(default=0.5, metadata={"help": "Gaussian eps std (x' is clipped to [0, 1])"})
    noise_clip: bool = field(default=False, metadata={"help": "clip Gaussian eps to [0, 1] instead of x'"})
    beta_alpha: float = field(default=0.5, metadata={"help": "Beta eps alpha (paper: 0.5; DNR-BL: 2)"})
    beta_beta: float = field(default=0.5, metadata={"help": "Beta eps beta (paper: 0.5; DNR-BL: 5)"})
    gen_hidden: int = field(default=64, metadata={"help": "hidden size of the generator's 2-layer MLP"})
    gen_condition: bool = field(default=True, metadata={
        "help": "condition the generator on the user state and candidate (else z and noise only)"})
    gen_lr: float = field(default=1e-3, metadata={"help": "generator Adam learning rate"})
    gen_every: int = field(default=1, metadata={"help": "one generator step every N reranker steps"})
    gen_warmup: bool = field(default=True, metadata={
        "help": "during the heuristic epochs, fit the generator to L_x alone, so it starts from realistic scores"})

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {sorted(VARIANTS)}")
        if self.dnr_pathway not in PATHWAYS:
            raise ValueError(f"dnr_pathway {self.dnr_pathway!r} is not one of {PATHWAYS}")
        if self.lx_estimator not in generator.LX_ESTIMATORS:
            raise ValueError(f"lx_estimator {self.lx_estimator!r} is not one of {generator.LX_ESTIMATORS}")
        if not 0.0 <= self.lambda_c <= 1.0:
            raise ValueError(f"lambda_c {self.lambda_c} is not in [0, 1]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        for name in ("dropout", "score_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} {getattr(self, name)} is not in [0, 1)")
        if self.lambda_e < 0 or self.gen_every < 1:
            raise ValueError(f"lambda_e {self.lambda_e} must be >= 0 and gen_every {self.gen_every} >= 1")
        if not 0.0 < self.gen_lambda_c <= 1.0:
            raise ValueError(f"gen_lambda_c {self.gen_lambda_c} is not in (0, 1]")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {DEVICES}")
        if self.warmup < 0:
            raise ValueError(f"warmup {self.warmup} must be >= 0")

    @property
    def switch_epoch(self) -> int:
        """The last epoch of heuristic noise: lambda_e epochs, or lambda_e x epochs when lambda_e < 1."""
        return round(self.lambda_e * self.epochs) if self.lambda_e < 1 else int(self.lambda_e)

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def pathway(self) -> str:
        return self.spec.pathway or self.dnr_pathway

    def noise(self, train_lists: CandidateLists | None = None) -> generator.HeuristicNoise | None:
        """The variant's heuristic noise; ``matched`` is fitted to ``train_lists``' real scores per label."""
        kind = self.spec.noise
        if kind is None:
            return None
        matched = None
        if kind == "matched":
            if train_lists is None:
                raise ValueError("matched noise is fitted to the training lists: pass them")
            matched = generator.HeuristicNoise.fit_matched(train_lists.scores, train_lists.labels, train_lists.mask)
        return generator.HeuristicNoise(kind, self.noise_mu, self.noise_sigma, self.beta_alpha, self.beta_beta,
                                        self.noise_clip, matched)


@dataclass
class TrainResult:
    model: Reranker
    best_epoch: int
    best_valid: dict[str, float]
    epochs: list[dict[str, float]] = field(default_factory=list)  # epoch, loss, seconds, valid metrics
    generator: generator.NoiseGenerator | None = None  # DNR's model-based generator, as trained last
    synthetic: np.ndarray | None = None  # x' on the validation lists' real candidates, from the last noise
    synthetic_z: np.ndarray | None = None  # the labels z of those candidates (x' - z: the synthetic noise)
    device: str = "cpu"  # where it trained

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([e["seconds"] for e in self.epochs]))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Step -> multiplier of ``cfg.lr``: a linear warm-up over ``cfg.warmup`` epochs, then 1 (constant) or a
    cosine decay that reaches ``cfg.lr_min`` at the end of the last epoch (cosine)."""
    warm = max(1, round(cfg.warmup * steps_per_epoch)) if cfg.warmup > 0 else 0
    total = max(warm + 1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / (total - warm))
        return cfg.lr_min + (1.0 - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def resolve_device(device: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; cuda without a GPU is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device (a CPU build, or no GPU visible)")
    return device


def seed_everything(seed: int, threads: int, device: str = "cpu") -> None:
    """Same seed, same machine, same result: fixed RNGs, deterministic kernels, fixed thread count."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if device == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; a kernel without a deterministic version warns.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    # Filling every new tensor with NaN (the deterministic-mode default) costs ~6% and buys no
    # reproducibility here: no kernel reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Batch:
    """Candidate lists as tensors on one device: the model's inputs in its argument order, and the labels z."""

    items: torch.Tensor  # (B, L)
    scores: torch.Tensor  # (B, L) the retriever's scores
    mask: torch.Tensor  # (B, L) real candidates
    history: torch.Tensor  # (B, H)
    profile: torch.Tensor  # (B, F)
    labels: torch.Tensor  # (B, L)

    @classmethod
    def of(cls, lists: CandidateLists, rows: np.ndarray | slice | None = None, device: str = "cpu") -> Batch:
        """``rows`` of ``lists`` (all of them when None) on ``device``."""
        sub = lists if rows is None else lists.subset(rows)
        return cls(*(torch.from_numpy(getattr(sub, f.name)).to(device) for f in dataclasses.fields(cls)))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def positions(self) -> torch.Tensor:
        return list_positions(len(self.items), self.items.shape[1], self.items.device)

    def logits(self, model: Reranker, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) logits of ``model`` on these lists, reading ``scores`` in place of the real ones when given
        (positions stay the real retriever order)."""
        return model(self.items, self.scores if scores is None else scores, self.mask, self.history, self.profile,
                     self.positions)

    def encode(self, model: Reranker) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``model``'s candidate encoding of these lists with the user state and candidate embeddings it read."""
        return model.encode_with_state(self.items, self.scores, self.mask, self.history, self.profile,
                                       self.positions)


def build_model(dataset: Dataset, cfg: TrainConfig, n_candidates: int) -> Reranker:
    model_cfg = ModelConfig(
        n_items=dataset.n_items,
        item_field_sizes=[len(f.vocab) for f in dataset.item_fields],
        user_field_sizes=[len(f.vocab) for f in dataset.user_fields],
        max_candidates=n_candidates,
        history_len=dataset.history_len,
        hidden=cfg.hidden,
        heads=cfg.heads,
        layers=cfg.layers,
        dropout=cfg.dropout,
        pathway=cfg.pathway,
        score_input=cfg.score_input,
        score_dropout=cfg.score_dropout,
        positions=cfg.positions and cfg.spec.without != "positions",
        history=cfg.history and cfg.spec.without != "history",
        side_features=cfg.side_features and cfg.spec.without != "side_features",
    )
    return Reranker(model_cfg, [torch.from_numpy(f.tokens) for f in dataset.item_fields])


def list_positions(n_lists: int, n_candidates: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Offline lists are stored in retriever order, so position = index (what the graph derives too)."""
    return torch.arange(n_candidates, device=device)[None].expand(n_lists, n_candidates)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the real candidates of a batch."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def model_device(model: nn.Module) -> str:
    return str(next(model.parameters()).device)


@torch.no_grad()
def predict(model: Reranker, lists: CandidateLists, batch_size: int = 1024) -> np.ndarray:
    """(N, L) logits of ``model`` on ``lists`` in eval mode."""
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, len(lists), batch_size):
        out.append(Batch.of(lists, slice(start, start + batch_size), device).logits(model).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, lists.items.shape[1]), dtype=np.float32)


def model_noise(model: Reranker, gen: generator.NoiseGenerator, t: Batch) -> torch.Tensor:
    """eps from the model-based generator, conditioned on the reranker's (detached) user state and candidates."""
    with torch.no_grad():
        table = model.item_table()
        user = model.user_state(table, t.history, t.profile)
        candidates = table[t.items]
    return gen(user, candidates, t.labels)


@dataclass
class Encoding:
    """A reranker step's candidate encoding with the user state and candidate embeddings it read, detached."""

    h: torch.Tensor  # (B, L, D)
    user: torch.Tensor  # (B, D)
    candidates: torch.Tensor  # (B, L, D)


def reranker_step(model: Reranker, opt: torch.optim.Optimizer, t: Batch,
                  synthetic: torch.Tensor | None, cfg: TrainConfig, gen: generator.NoiseGenerator | None = None
                  ) -> tuple[dict[str, float], Encoding]:
    """One step of L_theta = L_direct (BCE on the real scores) + lambda_m L_z (BCE on the synthetic scores x').

    x' is ``synthetic`` when given, else drawn from ``gen`` (when given) on this step's own user state and
    candidates, without a gradient: only the reranker's parameters move. x' is never blanked by score dropout.
    On a late pathway one encoder pass serves the real and the synthetic scores; on an early one the synthetic
    scores take a second pass. Returns the losses and the step's (detached) encoding.
    """
    h, user, candidates = t.encode(model)
    logits = model.score_logits(h, t.scores, t.mask)
    direct = masked_bce(logits, t.labels, t.mask)
    loss, out = direct, {"L_direct": direct.item()}
    if synthetic is None and gen is not None:
        with torch.no_grad():
            synthetic = generator.synthetic_scores(t.labels, gen(user, candidates, t.labels), cfg.gen_lambda_c)
    if synthetic is not None:
        synthetic = synthetic.detach()
        # Positions stay the real retriever order: the synthetic scores replace the score pathway's input only.
        logits_z = (model.score_logits(h, synthetic, t.mask, drop=False) if model.late_score else
                    t.logits(model, synthetic))
        l_z = masked_bce(logits_z, t.labels, t.mask)
        loss = direct + cfg.lambda_m * l_z
        out["L_z"] = l_z.item()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out, Encoding(h.detach(), user.detach(), candidates.detach())


def feature_range(score_input: str) -> tuple[float, float]:
    """The span of the score feature L_x's histograms cover: the standardised logit's bulk, or [0, 1]."""
    return (-4.0, 4.0) if score_input == "list" else (0.0, 1.0)


def distribution_term(model: Reranker, synthetic: torch.Tensor, t: Batch, cfg: TrainConfig) -> torch.Tensor:
    """L_x on what the reranker reads: the score feature of x' against that of the real scores, over the
    batch's real candidates (``lx_conditional``: per label, summed)."""
    mask = t.mask
    fake, real = model.score_input(synthetic, mask), model.score_input(t.scores, mask)
    lo, hi = feature_range(model.cfg.score_input)
    if not cfg.lx_conditional:
        return generator.distribution_loss(fake, real, mask, cfg.lx_estimator, lo=lo, hi=hi)
    terms = [generator.distribution_loss(fake, real, part, cfg.lx_estimator, lo=lo, hi=hi)
             for part in (mask & (t.labels > 0), mask & (t.labels == 0)) if part.any()]
    return torch.stack(terms).sum()


def generator_step(model: Reranker, gen: generator.NoiseGenerator, opt: torch.optim.Optimizer,
                   t: Batch, cfg: TrainConfig, calibration: generator.Calibration | None = None,
                   encoding: Encoding | None = None, adversarial: bool = True) -> dict[str, float]:
    """One step of the generator's loss L_adv + lambda_x L_x against the frozen reranker (Algorithm 1, line 6):
    only the generator's parameters move.

    The reranker runs in eval mode (no dropout, no score dropout) on the batch, its encoder under no_grad on a
    late pathway. ``calibration`` (p(z | x) of the real scores) makes L_adv Eq. 5's log q - log p; the variant
    decides whether it is used. ``adversarial`` False (the warm-up before lambda_e) fits L_x alone, reading the
    user state and candidates of ``encoding`` (the reranker step's) without any reranker pass.
    """
    spec = cfg.spec
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        h = None
        if adversarial or encoding is None:
            with torch.no_grad():
                h, user, candidates = t.encode(model)
        else:
            user, candidates = encoding.user, encoding.candidates
        synthetic = generator.synthetic_scores(t.labels, gen(user, candidates, t.labels), cfg.gen_lambda_c)
        loss = torch.zeros((), device=t.items.device)
        out: dict[str, float] = {}
        if spec.adv and adversarial:
            if model.late_score:
                assert h is not None
                logits = model.score_logits(h, synthetic, t.mask, drop=False)
            else:
                logits = t.logits(model, synthetic)
            true_logits = (calibration.logits(model.score_input(synthetic, t.mask))
                           if spec.calibrated and calibration is not None else None)
            l_adv = generator.adversarial_loss(logits, t.labels, t.mask, true_logits)
            loss = loss + l_adv
            out["L_adv"] = l_adv.item()
        if spec.lx:
            l_x = distribution_term(model, synthetic, t, cfg)
            loss = loss + cfg.lambda_x * l_x
            out["L_x"] = l_x.item()
        if out:
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        model.requires_grad_(True)
        model.train(was_training)
    return out


def fit_calibration(model: Reranker, lists: CandidateLists) -> generator.Calibration:
    """p(z | x) on the real candidates of ``lists``, as a logistic fit on the score feature the model reads."""
    with torch.no_grad():
        feature = model.score_input(torch.from_numpy(lists.scores), torch.from_numpy(lists.mask)).numpy()
    return generator.Calibration.fit(feature[lists.mask], lists.labels[lists.mask])


@torch.no_grad()
def sample_synthetic(model: Reranker, noise: generator.HeuristicNoise, gen: generator.NoiseGenerator | None,
                     lists: CandidateLists, cfg: TrainConfig, batch_size: int = 1024) -> np.ndarray:
    """(N, L) x' for ``lists`` from ``gen`` (or the heuristic noise when None); 0 on padding."""
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, len(lists), batch_size):
        t = Batch.of(lists, slice(start, start + batch_size), device)
        if gen is None:
            x = noise.synthetic(t.labels, cfg.lambda_c)
        else:
            x = generator.synthetic_scores(t.labels, model_noise(model, gen, t), cfg.gen_lambda_c)
        out.append((x * t.mask).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, lists.items.shape[1]), dtype=np.float32)


def list_auc(scores: np.ndarray, lists: CandidateLists) -> float:
    """Mean list AUC (%) of ``scores`` against the labels z of ``lists``."""
    return metrics.evaluate(scores, lists.labels, lists.mask)["AUC"]


@dataclass
class Best:
    """The epoch with the best validation N@6 so far, with a copy of the weights it had."""

    n6: float
    epoch: int
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]

    @classmethod
    def of(cls, model: Reranker, epoch: int, valid_metrics: dict[str, float]) -> Best:
        return cls(valid_metrics["N@6"], epoch, copy.deepcopy(model.state_dict()), valid_metrics)


@dataclass
class Fit:
    """What one training run moves: the reranker and its optimiser, and for synthetic variants the noise, the
    generator and its optimiser, and p(z | x) of the real scores (Eq. 5)."""

    cfg: TrainConfig
    lists: CandidateLists  # the training lists
    device: str
    model: Reranker
    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    noise: generator.HeuristicNoise | None
    gen: generator.NoiseGenerator | None
    gen_opt: torch.optim.Optimizer | None
    calibration: generator.Calibration | None
    order: torch.Generator  # draws each epoch's order of the training lists
    world: distributed.World = field(default_factory=distributed.World)  # under torchrun: this rank; else one

    @classmethod
    def start(cls, dataset: Dataset, train_lists: CandidateLists, cfg: TrainConfig) -> Fit:
        """Seeded, then built in a fixed order, so the same config gives the same run."""
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed, cfg.threads, device)
        model = build_model(dataset, cfg, train_lists.items.shape[1]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(train_lists) / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
        noise = cfg.noise(train_lists)
        gen = (generator.NoiseGenerator(cfg.hidden, cfg.gen_hidden, conditioned=cfg.gen_condition).to(device)
               if cfg.spec.generator else None)
        gen_opt = torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr) if gen is not None else None
        calibration = fit_calibration(model, train_lists) if gen is not None else None
        world = distributed.join(device)
        for module, optimiser in ((model, opt), (gen, gen_opt)):
            if module is not None and optimiser is not None:
                distributed.broadcast(module, world)
                distributed.average_gradients(optimiser, world)
        if world.parallel:  # each rank its own dropout and noise draws, as one process draws them per list
            seed_everything(int(np.random.SeedSequence([cfg.seed, world.rank]).generate_state(1)[0]), cfg.threads,
                            device)
        return cls(cfg, train_lists, device, model, opt, schedule, noise, gen, gen_opt, calibration,
                   torch.Generator().manual_seed(cfg.seed), world)

    def epoch(self, use_model: bool) -> dict[str, float]:
        """One pass over the training lists in a fresh order (Algorithm 1: a reranker step per batch and, every
        ``gen_every`` steps, a generator step); the mean of each loss over the steps that computed it."""
        cfg, spec = self.cfg, self.cfg.spec
        self.model.train()
        perm = torch.randperm(len(self.lists), generator=self.order).numpy()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for step, start in enumerate(range(0, len(perm), cfg.batch_size)):
            rows = perm[start : start + cfg.batch_size]
            if len(rows) < self.world.size:  # a last batch too small to give every rank a list: every rank skips it
                break
            t = Batch.of(self.lists, self.world.shard(rows), self.device)
            synthetic = self.noise.synthetic(t.labels, cfg.lambda_c) if self.noise is not None and not use_model \
                else None
            logs, encoding = reranker_step(self.model, self.opt, t, synthetic, cfg, self.gen if use_model else None)
            self.schedule.step()
            if self.gen is not None and self.gen_opt is not None and step % cfg.gen_every == 0 and (
                    use_model or (cfg.gen_warmup and spec.lx)):
                logs |= generator_step(self.model, self.gen, self.gen_opt, t, cfg, self.calibration, encoding,
                                       adversarial=use_model)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    def noise_auc(self, valid: CandidateLists, use_model: bool, real_auc: float | None) -> dict[str, float]:
        """Synthetic variants: the list AUC of x' (as this epoch made it) against z beside the real scores'."""
        if self.noise is None or real_auc is None:
            return {}
        x = sample_synthetic(self.model, self.noise, self.gen if use_model else None, valid, self.cfg)
        return {"xprime_auc": list_auc(x, valid), "x_auc": real_auc}


def train(dataset: Dataset, lists: dict[str, CandidateLists], cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a variant on the train lists; keep the epoch with the best validation N@6.

    PRM variants: BCE on the real scores. g / b / m: plus lambda_m x BCE on x' from heuristic noise. dnr-*: the
    same for the first lambda_e epochs (while the generator is fitted to L_x alone, ``gen_warmup``), then x' from
    the model-based generator, with a generator step (L_adv and/or L_x against the frozen reranker) after every
    ``gen_every`` reranker steps (Algorithm 1). Generator variants do not stop early before the generator has
    trained for ``patience`` epochs. Synthetic variants log, per epoch, the list AUC of x' against z on the
    validation lists beside that of the real scores.
    """
    fit = Fit.start(dataset, lists["train"], cfg)
    valid, switch = lists["valid"], cfg.switch_epoch
    min_epochs = switch + cfg.patience if fit.gen is not None else 0
    real_auc = list_auc(valid.scores, valid) if fit.noise is not None else None
    # Epoch 0, the untrained model, competes too: a residual model that learns nothing useful on validation
    # stays the retriever order instead of shipping an epoch that is worse than it.
    best = Best.of(fit.model, 0, metrics.evaluate(predict(fit.model, valid), valid.labels, valid.mask))
    epochs: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.variant} seed {cfg.seed}", leave=False, disable=not progress)
    for epoch in bar:
        use_model = fit.gen is not None and epoch > switch
        t0 = time.perf_counter()
        losses = fit.epoch(use_model)
        seconds = time.perf_counter() - t0
        valid_metrics = metrics.evaluate(predict(fit.model, valid), valid.labels, valid.mask)
        epochs.append({"epoch": epoch, "loss": losses["L_direct"], "seconds": seconds,
                       "lr": fit.opt.param_groups[0]["lr"], **losses, **fit.noise_auc(valid, use_model, real_auc),
                       **{f"valid_{k}": v for k, v in valid_metrics.items()}})
        bar.set_postfix(loss=f"{losses['L_direct']:.4f}", n6=f"{valid_metrics['N@6']:.2f}")
        if valid_metrics["N@6"] > best.n6:
            best = Best.of(fit.model, epoch, valid_metrics)
        elif epoch - best.epoch >= cfg.patience and epoch >= min_epochs:
            break
    return finish(fit, best, epochs, valid)


def finish(fit: Fit, best: Best, epochs: list[dict[str, float]], valid: CandidateLists) -> TrainResult:
    """The result: the best epoch's weights on the CPU in eval mode, and x' on the validation lists as the last
    epoch's noise made it (the noise plot)."""
    synthetic_z = final_synthetic = None
    if fit.noise is not None:
        last_gen = fit.gen if fit.gen is not None and fit.cfg.epochs > fit.cfg.switch_epoch else None
        x = sample_synthetic(fit.model, fit.noise, last_gen, valid, fit.cfg)
        final_synthetic, synthetic_z = x[valid.mask], valid.labels[valid.mask]
    fit.model.load_state_dict(best.state)
    fit.model.eval()
    fit.model.cpu()
    if fit.gen is not None:
        fit.gen.cpu()
    return TrainResult(fit.model, best.epoch, best.metrics, epochs, fit.gen, final_synthetic, synthetic_z, fit.device)

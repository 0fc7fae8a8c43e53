"""Training the reranker on candidate lists: BCE, DNR's synthetic scores and generator, early stopping on
validation N@6, fixed seeds.

Owns: the named variants, the training loop (reranker step, generator step), batching of ``CandidateLists``
into tensors, prediction, reproducibility. Does not know: data files, the retriever's internals or ONNX.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import generator, metrics
from training.candidates import CandidateLists
from training.data import Dataset
from training.model import PATHWAYS, ModelConfig, Reranker


@dataclass(frozen=True)
class Variant:
    """What a named variant trains: its score pathway and, for DNR, how it makes synthetic scores."""

    pathway: str | None  # None: TrainConfig.dnr_pathway
    noise: str | None = None  # heuristic eps (gaussian / beta); None: no synthetic scores, plain BCE
    generator: bool = False  # after lambda_e epochs eps comes from the model-based generator
    adv: bool = True  # the generator's loss has L_adv
    lx: bool = True  # the generator's loss has L_x
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
    "dnr-g": Variant(None, "gaussian", generator=True),
    "dnr-b": Variant(None, "beta", generator=True),
    "dnr-g-no-adv": Variant(None, "gaussian", generator=True, adv=False),
    "dnr-g-no-x": Variant(None, "gaussian", generator=True, lx=False),
    "dnr-b-no-adv": Variant(None, "beta", generator=True, adv=False),
    "dnr-b-no-x": Variant(None, "beta", generator=True, lx=False),
}


SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    variant: str = field(default="prm", metadata={"help": f"reranker variant: {', '.join(VARIANTS)}"})
    # 10 epochs at a constant lr 1e-2 (patience 3). On the leak-free lists (ML-100K, PRM seed 0, validation N@6):
    # 42.3 at epoch 10 and still rising; a cosine schedule did worse (8 epochs: 40.1 at batch 256 and lr 1e-2,
    # 37.1 at lr 2e-2), and so did hidden 32 (39.9). More epochs would help; they are what the table cannot afford.
    epochs: int = field(default=10, metadata={"help": "maximum training epochs"})
    patience: int = field(default=3, metadata={"help": "epochs without a better validation N@6 before stopping"})
    batch_size: int = field(default=512, metadata={"help": "lists per batch (paper: 2048 on ML-1M)"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate"})
    schedule: str = field(default="constant", metadata={
        "help": "learning-rate schedule: constant, or cosine (linear warm-up, then cosine decay to lr_min x lr "
                "at the last epoch)"})
    warmup: float = field(default=0.5, metadata={"help": "cosine schedule: warm-up epochs"})
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
        "help": "training only: share of lists whose score feature is blanked, so the encoder cannot lean on it"})
    positions: bool = field(default=True, metadata={"help": "position embedding over the retriever order"})
    history: bool = field(default=True, metadata={"help": "history encoder (else the profile alone)"})
    side_features: bool = field(default=True, metadata={"help": "item side features and the user profile"})
    seed: int = field(default=0, metadata={"help": "reranker seed"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    # DNR (variants g, b, dnr-*). Paper values are for ML-1M; see reports/ml100k.md for what we chose here.
    # late: the paper's fusion point, and the one where a single encoder pass serves the real scores, the
    # synthetic ones and the generator step (DNR's epoch ~1.1x PRM's instead of ~2.5x on an early pathway).
    dnr_pathway: str = field(default="late", metadata={"help": "score pathway of the g, b and dnr-* variants"})
    lambda_c: float = field(default=0.4, metadata={"help": "x' = (1 - lambda_c) z + lambda_c eps (paper: 0.4)"})
    lambda_m: float = field(default=0.4, metadata={"help": "weight of L_z, the BCE on synthetic scores (paper: 0.4)"})
    lambda_e: int = field(default=5, metadata={
        "help": "epochs of heuristic noise before the model-based generator starts (paper: 40 on ML-1M)"})
    lambda_x: float = field(default=1.0, metadata={"help": "weight of L_x in the generator's loss"})
    lx_estimator: str = field(default="kl", metadata={
        "help": "L_x: kl (soft-histogram KL(synthetic || real)) or w1 (1-Wasserstein)"})
    noise_mu: float = field(default=0.5, metadata={"help": "Gaussian eps mean"})
    noise_sigma: float = field(default=0.5, metadata={"help": "Gaussian eps std (x' is clipped to [0, 1])"})
    noise_clip: bool = field(default=False, metadata={"help": "clip Gaussian eps to [0, 1] instead of x'"})
    beta_alpha: float = field(default=0.5, metadata={"help": "Beta eps alpha (paper: 0.5; option 2)"})
    beta_beta: float = field(default=0.5, metadata={"help": "Beta eps beta (paper: 0.5; option 5)"})
    gen_hidden: int = field(default=64, metadata={"help": "hidden size of the generator's 2-layer MLP"})
    gen_condition: bool = field(default=True, metadata={
        "help": "condition the generator on the user state and candidate (else z and noise only)"})
    gen_lr: float = field(default=1e-3, metadata={"help": "generator Adam learning rate"})
    gen_every: int = field(default=2, metadata={"help": "one generator step every N reranker steps"})

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

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def pathway(self) -> str:
        return self.spec.pathway or self.dnr_pathway

    def noise(self) -> generator.HeuristicNoise | None:
        kind = self.spec.noise
        if kind is None:
            return None
        return generator.HeuristicNoise(kind, self.noise_mu, self.noise_sigma, self.beta_alpha, self.beta_beta,
                                        self.noise_clip)


@dataclass
class TrainResult:
    model: Reranker
    best_epoch: int
    best_valid: dict[str, float]
    epochs: list[dict[str, float]] = field(default_factory=list)  # epoch, loss, seconds, valid metrics
    generator: generator.NoiseGenerator | None = None  # DNR's model-based generator, as trained last
    synthetic: np.ndarray | None = None  # x' on the validation lists' real candidates, from the last noise

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([e["seconds"] for e in self.epochs]))


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Step -> multiplier of ``cfg.lr``: 1 throughout (constant), or a linear warm-up over ``cfg.warmup``
    epochs, then a cosine decay that reaches ``cfg.lr_min`` at the end of the last epoch (cosine)."""
    if cfg.schedule == "constant":
        return lambda step: 1.0
    warm = max(1, round(cfg.warmup * steps_per_epoch))
    total = max(warm + 1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / (total - warm))
        return cfg.lr_min + (1.0 - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def seed_everything(seed: int, threads: int) -> None:
    """Same seed, same machine, same result: fixed RNGs, deterministic kernels, fixed thread count."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Filling every new tensor with NaN (the deterministic-mode default) costs ~6% and buys no
    # reproducibility here: no kernel reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def to_tensors(lists: CandidateLists, rows: np.ndarray | slice | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs (and labels) for ``rows`` of ``lists``."""
    sub = lists if rows is None else lists.subset(rows)
    return {
        "items": torch.from_numpy(sub.items),
        "scores": torch.from_numpy(sub.scores),
        "mask": torch.from_numpy(sub.mask),
        "history": torch.from_numpy(sub.history),
        "profile": torch.from_numpy(sub.profile),
        "labels": torch.from_numpy(sub.labels),
    }


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


def list_positions(n_lists: int, n_candidates: int) -> torch.Tensor:
    """Offline lists are stored in retriever order, so position = index (what the graph derives too)."""
    return torch.arange(n_candidates)[None].expand(n_lists, n_candidates)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the real candidates of a batch."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def predict(model: Reranker, lists: CandidateLists, batch_size: int = 1024) -> np.ndarray:
    """(N, L) logits of ``model`` on ``lists`` in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        t = to_tensors(lists, slice(start, start + batch_size))
        positions = list_positions(len(t["items"]), t["items"].shape[1])
        out.append(model(t["items"], t["scores"], t["mask"], t["history"], t["profile"], positions).numpy())
    return np.concatenate(out) if out else np.zeros((0, lists.items.shape[1]), dtype=np.float32)


def model_noise(model: Reranker, gen: generator.NoiseGenerator, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """eps from the model-based generator, conditioned on the reranker's (detached) user state and candidates."""
    with torch.no_grad():
        table = model.item_table()
        user = model.user_state(table, t["history"], t["profile"])
        candidates = table[t["items"]]
    return gen(user, candidates, t["labels"])


@dataclass
class Encoding:
    """A reranker step's candidate encoding with the user state and candidate embeddings it read, detached:
    on a late pathway the generator step reuses it instead of running the encoder again."""

    h: torch.Tensor  # (B, L, D)
    user: torch.Tensor  # (B, D)
    candidates: torch.Tensor  # (B, L, D)


def reranker_step(model: Reranker, opt: torch.optim.Optimizer, t: dict[str, torch.Tensor],
                  eps: torch.Tensor | None, cfg: TrainConfig, gen: generator.NoiseGenerator | None = None
                  ) -> tuple[dict[str, float], Encoding]:
    """One step of L_theta = L_direct (BCE on the real scores) + lambda_m L_z (BCE on x' from the noise).

    The noise is ``eps`` when given, else drawn from ``gen`` (when given) on this step's own user state and
    candidates, without a gradient: only the reranker's parameters move. On a late pathway one encoder pass
    serves the real and the synthetic scores; on an early one the synthetic scores take a second pass.
    Returns the losses and the step's (detached) encoding.
    """
    positions = list_positions(len(t["items"]), t["items"].shape[1])
    h, user, candidates = model.encode_with_state(t["items"], t["scores"], t["mask"], t["history"], t["profile"],
                                                  positions)
    logits = model.score_logits(h, t["scores"], t["mask"])
    direct = masked_bce(logits, t["labels"], t["mask"])
    loss, out = direct, {"L_direct": direct.item()}
    if eps is None and gen is not None:
        with torch.no_grad():
            eps = gen(user, candidates, t["labels"])
    if eps is not None:
        synthetic = generator.synthetic_scores(t["labels"], eps.detach(), cfg.lambda_c)
        # Positions stay the real retriever order: the synthetic scores replace the score pathway's input only.
        logits_z = (model.score_logits(h, synthetic, t["mask"]) if model.late_score else
                    model(t["items"], synthetic, t["mask"], t["history"], t["profile"], positions))
        l_z = masked_bce(logits_z, t["labels"], t["mask"])
        loss = direct + cfg.lambda_m * l_z
        out["L_z"] = l_z.item()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out, Encoding(h.detach(), user.detach(), candidates.detach())


def generator_step(model: Reranker, gen: generator.NoiseGenerator, opt: torch.optim.Optimizer,
                   t: dict[str, torch.Tensor], cfg: TrainConfig, encoding: Encoding | None = None
                   ) -> dict[str, float]:
    """One step of the generator's loss L_adv + lambda_x L_x against the frozen reranker (no parameter
    gradients): only the generator's parameters move.

    With ``encoding`` (a late pathway's reranker step on this batch) the generator reads that step's user state
    and candidates and the reranker scores x' on that encoding with its updated head: no encoder pass at all.
    Without it, the reranker runs in eval mode on the batch (the encoder under no_grad on a late pathway).
    """
    spec = cfg.spec
    was_training = model.training
    if encoding is None:
        model.eval()
    model.requires_grad_(False)
    try:
        if encoding is not None:
            eps = gen(encoding.user, encoding.candidates, t["labels"])
        else:
            eps = model_noise(model, gen, t)
        synthetic = generator.synthetic_scores(t["labels"], eps, cfg.lambda_c)
        loss = torch.zeros(())
        out: dict[str, float] = {}
        if spec.adv:
            positions = list_positions(len(t["items"]), t["items"].shape[1])
            if encoding is not None and model.late_score:
                logits = model.score_logits(encoding.h, synthetic, t["mask"])
            elif model.late_score:  # the encoder does not read the score: no graph through it
                with torch.no_grad():
                    h = model.encode(t["items"], t["scores"], t["mask"], t["history"], t["profile"], positions)
                logits = model.score_logits(h, synthetic, t["mask"])
            else:
                logits = model(t["items"], synthetic, t["mask"], t["history"], t["profile"], positions)
            l_adv = generator.adversarial_loss(logits, t["labels"], t["mask"])
            loss = loss + l_adv
            out["L_adv"] = l_adv.item()
        if spec.lx:
            l_x = generator.distribution_loss(synthetic, t["scores"], t["mask"], cfg.lx_estimator)
            loss = loss + cfg.lambda_x * l_x
            out["L_x"] = l_x.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    finally:
        model.requires_grad_(True)
        model.train(was_training)
    return out


@torch.no_grad()
def sample_synthetic(model: Reranker, noise: generator.HeuristicNoise, gen: generator.NoiseGenerator | None,
                     lists: CandidateLists, cfg: TrainConfig, batch_size: int = 1024) -> np.ndarray:
    """x' on the real candidates of ``lists`` from ``gen`` (or the heuristic noise when None)."""
    model.eval()
    out = []
    for start in range(0, len(lists), batch_size):
        t = to_tensors(lists, slice(start, start + batch_size))
        eps = noise.sample(t["labels"].shape) if gen is None else model_noise(model, gen, t)
        out.append(generator.synthetic_scores(t["labels"], eps, cfg.lambda_c)[t["mask"]].numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train(dataset: Dataset, lists: dict[str, CandidateLists], cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a variant on the train lists; keep the epoch with the best validation N@6.

    PRM variants: BCE on the real scores. g / b: plus lambda_m x BCE on x' from heuristic noise. dnr-*: the
    same for the first lambda_e epochs, then eps from the model-based generator, with a generator step
    (L_adv and/or L_x against the frozen reranker) after every ``gen_every`` reranker steps. Generator
    variants do not stop early before the generator has trained for ``patience`` epochs.
    """
    seed_everything(cfg.seed, cfg.threads)
    n_candidates = lists["train"].items.shape[1]
    model = build_model(dataset, cfg, n_candidates)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(lists["train"]) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    spec, noise = cfg.spec, cfg.noise()
    gen = (generator.NoiseGenerator(cfg.hidden, cfg.gen_hidden, conditioned=cfg.gen_condition)
           if spec.generator else None)
    gen_opt = torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr) if gen is not None else None
    min_epochs = cfg.lambda_e + cfg.patience if gen is not None else 0
    perm_gen = torch.Generator().manual_seed(cfg.seed)
    train_lists, valid = lists["train"], lists["valid"]
    # Epoch 0, the untrained model, competes too: a residual model that learns nothing useful on validation
    # stays the retriever order instead of shipping an epoch that is worse than it.
    init_metrics = metrics.evaluate(predict(model, valid), valid.labels, valid.mask)
    best = (init_metrics["N@6"], 0, copy.deepcopy(model.state_dict()), init_metrics)
    epochs: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.variant} seed {cfg.seed}", leave=False, disable=not progress)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train_lists), generator=perm_gen).numpy()
        use_model = gen is not None and epoch > cfg.lambda_e
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for step, start in enumerate(range(0, len(perm), cfg.batch_size)):
            t = to_tensors(train_lists, perm[start : start + cfg.batch_size])
            eps = noise.sample(t["labels"].shape) if noise is not None and not use_model else None
            logs, encoding = reranker_step(model, opt, t, eps, cfg, gen if use_model else None)
            schedule.step()
            if use_model and gen is not None and gen_opt is not None and step % cfg.gen_every == 0:
                logs |= generator_step(model, gen, gen_opt, t, cfg, encoding if model.late_score else None)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        seconds = time.perf_counter() - t0
        scores = predict(model, valid)
        valid_metrics = metrics.evaluate(scores, valid.labels, valid.mask)
        losses = {k: sums[k] / counts[k] for k in sums}
        epochs.append({"epoch": epoch, "loss": losses["L_direct"], "seconds": seconds,
                       "lr": opt.param_groups[0]["lr"], **losses,
                       **{f"valid_{k}": v for k, v in valid_metrics.items()}})
        bar.set_postfix(loss=f"{losses['L_direct']:.4f}", n6=f"{valid_metrics['N@6']:.2f}")
        if valid_metrics["N@6"] > best[0]:
            best = (valid_metrics["N@6"], epoch, copy.deepcopy(model.state_dict()), valid_metrics)
        elif epoch - best[1] >= cfg.patience and epoch >= min_epochs:
            break
    synthetic = sample_synthetic(model, noise, gen if gen is not None and cfg.epochs > cfg.lambda_e else None,
                                 valid, cfg) if noise is not None else None
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, best[1], best[3], epochs, gen, synthetic)

"""DNR's synthetic retriever scores: the noise generators, the score calibration and the generator's losses.

Owns: x' = (1 - lambda_c) z + lambda_c eps (Eq. 4), the heuristic noise (Gaussian, Beta, and Beta fitted per
label to the observed noise x - z), the model-based generator (a 2-layer MLP on the user state, the candidate,
z and random noise that outputs x' itself: lambda_c 1, section 3.3), the calibration p(z | x) of the real
scores, and the generator's losses L_adv and L_x.
Does not know: the training loop (``train.py``), the reranker's internals beyond its inputs, data files.

Shapes: B lists, L candidates, D hidden. ``z`` is the feedback label per candidate (0/1, 0 on padding).

Why a calibration: Eq. 5's L_adv = E[log q(z | x') - log p(z | x')], the reranker's likelihood over the true
feedback likelihood of the same synthetic score. Section 3.3 minimises log q(z | x') alone (Eq. 7), which pays
the generator for scores that lie about the label: on ML-100K it learned x' with list AUC 0.44 against z (real
scores: 0.79). ``Calibration`` estimates p(z | x) from the real (x, z) pairs of the training lists (a logistic
fit on the score feature the reranker reads), so an inverted x' is as unlikely under p as under q and earns
nothing; what is left to win is x' that the score calls right and the reranker gets wrong.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NOISES = ("gaussian", "beta", "matched")
LX_ESTIMATORS = ("kl", "w1")


def synthetic_scores(z: torch.Tensor, eps: torch.Tensor, lambda_c: float) -> torch.Tensor:
    """x' = (1 - lambda_c) z + lambda_c eps, clipped to the retriever's range [0, 1].

    With z in {0, 1} and eps in [0, 1] the clip never binds; it only matters for unclipped Gaussian noise.
    """
    return ((1.0 - lambda_c) * z + lambda_c * eps).clamp(0.0, 1.0)


def beta_moments(x: np.ndarray) -> tuple[float, float]:
    """Beta(alpha, beta) with the mean and variance of ``x`` (values in (0, 1)): the method of moments."""
    x = np.clip(np.asarray(x, dtype=np.float64), 1e-4, 1 - 1e-4)
    mean, var = float(x.mean()), float(x.var())
    common = mean * (1.0 - mean) / max(var, 1e-8) - 1.0
    if common <= 0:
        raise ValueError(f"scores with mean {mean:.3f} and variance {var:.3f} fit no Beta distribution")
    return mean * common, (1.0 - mean) * common


class HeuristicNoise:
    """Synthetic scores from a fixed distribution (the heuristic generators).

    gaussian: eps ~ N(mu, sigma^2). The paper does not say how it keeps x' in [0, 1]. By default x' is clipped
        (not eps), so a large |eps| can still push a positive below a negative; ``clip_noise`` clips eps instead.
    beta: eps ~ Beta(alpha, beta) on [0, 1]; (0.5, 0.5) is the paper's U-shaped default, (2, 5) its DNR-BL.
    matched: x' | z ~ Beta fitted (``fit_matched``) to the real scores of label z in the training lists, i.e.
        noise x' - z distributed like the observed noise x - z of each label; lambda_c plays no part (it is 1).
    """

    def __init__(self, kind: str, mu: float = 0.5, sigma: float = 0.5, alpha: float = 0.5, beta: float = 0.5,
                 clip_noise: bool = False, matched: tuple[tuple[float, float], tuple[float, float]] | None = None
                 ) -> None:
        if kind not in NOISES:
            raise ValueError(f"noise {kind!r} is not one of {NOISES}")
        if sigma <= 0 or alpha <= 0 or beta <= 0:
            raise ValueError(f"noise parameters must be positive (sigma {sigma}, alpha {alpha}, beta {beta})")
        if kind == "matched" and matched is None:
            raise ValueError("matched noise needs the per-label Beta parameters (fit_matched)")
        self.kind = kind
        self.mu, self.sigma, self.clip_noise = mu, sigma, clip_noise
        self.matched = matched
        self._beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(beta)))
        if matched is not None:
            (a0, b0), (a1, b1) = matched
            self._by_label = torch.distributions.Beta(torch.tensor([a0, a1]), torch.tensor([b0, b1]))

    @staticmethod
    def fit_matched(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray
                    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """((alpha, beta) of label 0, (alpha, beta) of label 1) fitted to the real candidates' scores."""
        real = mask.astype(bool)
        return (beta_moments(scores[real & (labels == 0)]), beta_moments(scores[real & (labels > 0)]))

    def sample(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """eps of ``shape`` from torch's global RNG (seeded per training run); gaussian and beta only."""
        if self.kind == "gaussian":
            eps = self.mu + self.sigma * torch.randn(shape)
            return eps.clamp(0.0, 1.0) if self.clip_noise else eps
        if self.kind == "beta":
            return self._beta.sample(torch.Size(shape))
        raise ValueError("matched noise depends on z: use synthetic()")

    def synthetic(self, z: torch.Tensor, lambda_c: float) -> torch.Tensor:
        """x' for labels ``z`` (B, L), on z's device."""
        if self.kind == "matched":
            draws = self._by_label.sample(torch.Size(z.shape))  # (B, L, 2): a draw under each label
            x = torch.where(z.cpu() > 0, draws[..., 1], draws[..., 0])
            return x.clamp(0.0, 1.0).to(z.device)
        return synthetic_scores(z, self.sample(z.shape).to(z.device), lambda_c)


class NoiseGenerator(nn.Module):
    """Model-based eps in (0, 1): a 2-layer MLP on [user state, candidate embedding, z, random noise].

    With lambda_c 1 (the paper's choice for this generator, and ours) x' = eps: the generator outputs the
    synthetic score itself. Outputting x' through a sigmoid or a noise n in [-1, 1] added to z span the same
    functions here, because z is an input. The user state and candidate embedding come from the reranker,
    detached: the generator reads them and never trains them (``conditioned=False`` drops them). The random
    input (``noise_dim`` standard normals per candidate) makes x' a distribution per (user, candidate, z).
    """

    def __init__(self, dim: int, hidden: int = 64, noise_dim: int = 8, conditioned: bool = True) -> None:
        super().__init__()
        self.noise_dim, self.conditioned = noise_dim, conditioned
        inputs = (2 * dim if conditioned else 0) + 1 + noise_dim
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, user: torch.Tensor, candidates: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, L, D), (B, L) -> eps (B, L)."""
        b, n, _ = candidates.shape
        parts = [z[..., None], torch.randn(b, n, self.noise_dim, device=z.device)]
        if self.conditioned:
            parts = [user.detach()[:, None].expand(b, n, -1), candidates.detach(), *parts]
        return torch.sigmoid(self.net(torch.cat(parts, dim=-1))).squeeze(-1)


class Calibration:
    """p(z = 1 | x) = sigmoid(a + b f), a logistic fit of the label on the score feature f the reranker reads,
    over the real candidates of the training lists: the estimate of the true feedback likelihood p_{z|x}."""

    def __init__(self, a: float = 0.0, b: float = 0.0) -> None:
        self.a, self.b = a, b

    @classmethod
    def fit(cls, feature: np.ndarray, z: np.ndarray, iterations: int = 50) -> Calibration:
        """Newton's method on the two parameters (the log-likelihood is concave)."""
        f = np.asarray(feature, dtype=np.float64)
        y = np.asarray(z, dtype=np.float64)
        x = np.stack([np.ones_like(f), f], axis=1)  # (N, 2)
        w = np.zeros(2)
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(x @ w)))
            grad = x.T @ (y - p)
            hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            w += step
            if np.abs(step).max() < 1e-8:
                break
        return cls(float(w[0]), float(w[1]))

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        return self.a + self.b * feature


def adversarial_loss(logits: torch.Tensor, z: torch.Tensor, mask: torch.Tensor,
                     true_logits: torch.Tensor | None = None) -> torch.Tensor:
    """L_adv = E[log q(z | x') - log p(z | x')] over the real candidates.

    ``logits`` are the frozen reranker's on x' (log q); ``true_logits`` the calibration's on the same x' (log p).
    Without them this is Eq. 7's -BCE(reranker(x'), z) alone: minimising it lowers the reranker's likelihood of
    the labels by any means, an inverted score included.
    """
    loss = -nn.functional.binary_cross_entropy_with_logits(logits, z, reduction="none")
    if true_logits is not None:
        loss = loss + nn.functional.binary_cross_entropy_with_logits(true_logits, z, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def soft_histogram(x: torch.Tensor, mask: torch.Tensor, bins: int = 20, lo: float = 0.0, hi: float = 1.0
                   ) -> torch.Tensor:
    """(bins,) probabilities of the masked values of ``x`` over [lo, hi] (values outside count in the end
    bins), each value spread over the bins by a Gaussian kernel one bin wide: differentiable in ``x``."""
    width = (hi - lo) / bins
    centres = lo + (torch.arange(bins, dtype=x.dtype, device=x.device) + 0.5) * width
    values = x[mask].clamp(lo, hi)
    weights = torch.exp(-0.5 * ((values[:, None] - centres[None]) / width) ** 2)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    hist = weights.sum(0) + 1e-4
    return hist / hist.sum()


def distribution_loss(synthetic: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, estimator: str = "kl",
                      bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """L_x: distance between the batch's synthetic and real score distributions (over the masked entries).

    kl: KL(p_synthetic || p_real) between soft histograms on [lo, hi] (the paper's KL, estimated per batch).
    w1: the 1-Wasserstein distance between the two empirical distributions (mean |sorted x' - sorted x|),
        which has useful gradients even where the histograms do not overlap.
    """
    if estimator == "kl":
        p, q = soft_histogram(synthetic, mask, bins, lo, hi), soft_histogram(real.detach(), mask, bins, lo, hi)
        return (p * (p.log() - q.log())).sum()
    if estimator == "w1":
        return (synthetic[mask].sort().values - real.detach()[mask].sort().values).abs().mean()
    raise ValueError(f"L_x estimator {estimator!r} is not one of {LX_ESTIMATORS}")

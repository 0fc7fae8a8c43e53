"""DNR's synthetic retriever scores: the noise generators and the generator's losses.

Owns: x' = (1 - lambda_c) z + lambda_c eps, the heuristic noise (Gaussian, Beta), the model-based generator
(a 2-layer MLP on the user state, the candidate and z), and the generator's losses L_adv and L_x.
Does not know: the training loop (``train.py``), the reranker's internals beyond its inputs, data files.

Shapes: B lists, L candidates, D hidden. ``z`` is the feedback label per candidate (0/1, 0 on padding).
"""

from __future__ import annotations

import torch
from torch import nn

NOISES = ("gaussian", "beta")
LX_ESTIMATORS = ("kl", "w1")


def synthetic_scores(z: torch.Tensor, eps: torch.Tensor, lambda_c: float) -> torch.Tensor:
    """x' = (1 - lambda_c) z + lambda_c eps, clipped to the retriever's range [0, 1].

    With z in {0, 1} and eps in [0, 1] the clip never binds; it only matters for unclipped Gaussian noise.
    """
    return ((1.0 - lambda_c) * z + lambda_c * eps).clamp(0.0, 1.0)


class HeuristicNoise:
    """eps for the heuristic generators, drawn from a fixed distribution.

    gaussian: N(mu, sigma^2). The paper does not say how it keeps x' in [0, 1]. By default x' is clipped (not
        eps), so a large |eps| can still push a positive below a negative; ``clip_noise`` clips eps to [0, 1]
        instead, which forbids that.
    beta: Beta(alpha, beta) on [0, 1]; (0.5, 0.5) is the paper's U-shaped default, (2, 5) an option.
    """

    def __init__(self, kind: str, mu: float = 0.5, sigma: float = 0.5, alpha: float = 0.5, beta: float = 0.5,
                 clip_noise: bool = False) -> None:
        if kind not in NOISES:
            raise ValueError(f"noise {kind!r} is not one of {NOISES}")
        if sigma <= 0 or alpha <= 0 or beta <= 0:
            raise ValueError(f"noise parameters must be positive (sigma {sigma}, alpha {alpha}, beta {beta})")
        self.kind = kind
        self.mu, self.sigma, self.clip_noise = mu, sigma, clip_noise
        self._beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(beta)))

    def sample(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """eps of ``shape`` from torch's global RNG (seeded per training run)."""
        if self.kind == "gaussian":
            eps = self.mu + self.sigma * torch.randn(shape)
            return eps.clamp(0.0, 1.0) if self.clip_noise else eps
        return self._beta.sample(torch.Size(shape))


class NoiseGenerator(nn.Module):
    """Model-based eps in [0, 1]: a 2-layer MLP on [user state, candidate embedding, z, random noise].

    The user state and candidate embedding come from the reranker, detached: the generator reads them and
    never trains them (``conditioned=False`` drops them: eps from z and noise only). The random input
    (``noise_dim`` standard normals per candidate) makes eps a distribution per (user, candidate, z) rather
    than one value. A sigmoid keeps eps in (0, 1).
    """

    def __init__(self, dim: int, hidden: int = 64, noise_dim: int = 8, conditioned: bool = True) -> None:
        super().__init__()
        self.noise_dim, self.conditioned = noise_dim, conditioned
        inputs = (2 * dim if conditioned else 0) + 1 + noise_dim
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, user: torch.Tensor, candidates: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, L, D), (B, L) -> eps (B, L)."""
        b, n, _ = candidates.shape
        parts = [z[..., None], torch.randn(b, n, self.noise_dim)]
        if self.conditioned:
            parts = [user.detach()[:, None].expand(b, n, -1), candidates.detach(), *parts]
        return torch.sigmoid(self.net(torch.cat(parts, dim=-1))).squeeze(-1)


def adversarial_loss(logits: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_adv = -BCE(reranker(x'), z): minimising it lowers the frozen reranker's likelihood of the labels."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, z, reduction="none")
    return -(bce * mask).sum() / mask.sum().clamp(min=1)


def soft_histogram(x: torch.Tensor, mask: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """(bins,) probabilities of the masked values of ``x`` over [0, 1], each value spread over the bins by
    a Gaussian kernel one bin wide: differentiable in ``x``."""
    centres = (torch.arange(bins, dtype=x.dtype) + 0.5) / bins
    values = x[mask]
    weights = torch.exp(-0.5 * ((values[:, None] - centres[None]) * bins) ** 2)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    hist = weights.sum(0) + 1e-4
    return hist / hist.sum()


def distribution_loss(synthetic: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, estimator: str = "kl",
                      bins: int = 20) -> torch.Tensor:
    """L_x: distance between the batch's synthetic and real retriever-score distributions.

    kl: KL(p_synthetic || p_real) between soft histograms on [0, 1] (the paper's KL, estimated per batch).
    w1: the 1-Wasserstein distance between the two empirical distributions (mean |sorted x' - sorted x|),
        which has useful gradients even where the histograms do not overlap.
    """
    if estimator == "kl":
        p, q = soft_histogram(synthetic, mask, bins), soft_histogram(real.detach(), mask, bins)
        return (p * (p.log() - q.log())).sum()
    if estimator == "w1":
        return (synthetic[mask].sort().values - real.detach()[mask].sort().values).abs().mean()
    raise ValueError(f"L_x estimator {estimator!r} is not one of {LX_ESTIMATORS}")

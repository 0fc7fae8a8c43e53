"""The PRM reranker backbone with a retriever-score pathway, written to export cleanly to ONNX.

Owns: item and user encoders, the candidate transformer, the score pathways (none / concat / add /
weight), and the in-graph preprocessing the exported model carries (item side-feature tables, list
positions derived from the retriever scores). Does not know: data files, losses, training loops.

Inputs (B = lists, L = candidates, H = history, F = profile fields):
    items   (B, L) int64   item indices (0 pad, 1 OOV)
    scores  (B, L) float32 retriever scores in [0, 1]
    mask    (B, L) bool    True on real candidates
    history (B, H) int64   items before the request, most recent last, 0-padded
    profile (B, F) int64   user profile tokens, 0 = unknown
Output: logits (B, L) float32; padded positions get ``MASKED_LOGIT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

PATHWAYS = ("none", "concat", "add", "weight", "residual", "late")
# What a score pathway reads: the score as the retriever sent it, or its logit standardised within the list
# (mean 0, std 1 over the real candidates), which keeps the order and the spread and drops the calibration.
SCORE_INPUTS = ("raw", "list")
# Where the retriever score enters: before the candidate encoder (early), or only after it, so that one encoder
# pass serves any number of score vectors (DNR's real and synthetic scores).
EARLY_PATHWAYS = ("concat", "add", "weight")
SCORE_EPS = 1e-4  # residual pathway: scores are clamped to [eps, 1 - eps] before the logit
MASKED_LOGIT = -1e4
NEG_INF = -1e4  # additive attention bias; finite so an all-padding row stays finite


@dataclass
class ModelConfig:
    n_items: int
    item_field_sizes: list[int] = field(default_factory=list)  # vocab size per item field (without pad)
    user_field_sizes: list[int] = field(default_factory=list)  # vocab size per profile field
    max_candidates: int = 50
    history_len: int = 30
    hidden: int = 128
    heads: int = 2
    layers: int = 2
    history_layers: int = 1
    dropout: float = 0.3
    pathway: str = "none"
    score_input: str = "list"
    score_dropout: float = 0.0  # training only: the share of lists whose score feature is blanked (set to 0)
    # Ablation switches (what the model reads); the exported graph keeps every input either way.
    positions: bool = True  # the position embedding over the retriever order
    history: bool = True  # the history encoder (else the user state is the profile alone)
    side_features: bool = True  # item side features and the user profile

    def __post_init__(self) -> None:
        if self.pathway not in PATHWAYS:
            raise ValueError(f"pathway {self.pathway!r} is not one of {PATHWAYS}")
        if self.score_input not in SCORE_INPUTS:
            raise ValueError(f"score_input {self.score_input!r} is not one of {SCORE_INPUTS}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        for name in ("dropout", "score_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} {getattr(self, name)} is not in [0, 1)")


class Dropout(nn.Module):
    """Inverted dropout from random bytes: ``nn.Dropout``'s maths with p rounded to a multiple of 1/256.

    One random int32 makes four byte-sized uniforms, so the mask costs ~1/6 of ``torch.rand_like`` and ~1/9 of
    ``bernoulli_`` on CPU (measured on this project's 2-core machine, where dropout took a quarter of a PRM step).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 256)  # a byte below it drops its element
        self.scale = 256.0 / (256 - self.threshold) if self.threshold < 256 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        words = torch.randint(-(2**31), 2**31 - 1, ((n + 3) // 4,), dtype=torch.int32, device=x.device)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * keep * self.scale


class Block(nn.Module):
    """Pre-norm transformer encoder layer with an explicit additive key mask (exports to plain ops)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-1, -2)) * self.scale + key_bias[:, None, None, :]  # (B, h, n, n)
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)  # (B, n, D)
        x = x + self.drop(self.proj(out))
        return x + self.drop(self.ff(self.norm2(x)))


class FieldEmbedding(nn.Module):
    """Mean of the token embeddings of each field, summed over fields; index 0 is padding."""

    def __init__(self, sizes: list[int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(size + 1, dim, padding_idx=0) for size in sizes)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor | None = None
        for table, tok in zip(self.tables, tokens, strict=True):  # tok (..., T)
            emb = table(tok).sum(-2) / (tok > 0).sum(-1, keepdim=True).clamp(min=1)
            out = emb if out is None else out + emb
        assert out is not None
        return out


class Reranker(nn.Module):
    """PRM: candidates (item + user state + position [+ score]) -> transformer -> one logit each."""

    def __init__(self, cfg: ModelConfig, item_field_tokens: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(cfg.n_items, d, padding_idx=0)
        # Side-feature tables travel inside the graph as buffers: the service sends item indices only.
        tokens = item_field_tokens or []
        if len(tokens) != len(cfg.item_field_sizes):
            raise ValueError(f"{len(tokens)} item field tables for {len(cfg.item_field_sizes)} item fields")
        for i, tok in enumerate(tokens):
            self.register_buffer(f"item_field_{i}", tok.long(), persistent=True)
        self.item_fields = FieldEmbedding(cfg.item_field_sizes, d)
        self.user_fields = FieldEmbedding(cfg.user_field_sizes, d)
        self.hist_pos = nn.Parameter(torch.zeros(cfg.history_len, d))
        self.hist_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.history_layers))
        self.user_proj = nn.Linear(2 * d, d)
        self.pos_emb = nn.Embedding(cfg.max_candidates, d)
        if cfg.pathway in ("concat", "late"):
            self.score_mlp = nn.Sequential(nn.Linear(1, d // 4), nn.ReLU(), nn.Linear(d // 4, d // 4))
        if cfg.pathway == "concat":
            self.score_join = nn.Linear(d + d // 4, d)
        elif cfg.pathway in ("add", "weight"):
            self.score_mlp = nn.Sequential(nn.Linear(1, d // 4), nn.ReLU(), nn.Linear(d // 4, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        head_in = d + d // 4 if cfg.pathway == "late" else d
        self.head = nn.Sequential(nn.Linear(head_in, d), nn.ReLU(), nn.Linear(d, 1))
        if cfg.pathway == "residual":
            # logit = scale * logit(score) + bias + correction, the correction starting at 0: an untrained model
            # is the retriever order, and training moves it only where the data pay for it.
            self.score_scale = nn.Parameter(torch.ones(()))
            self.score_bias = nn.Parameter(torch.zeros(()))
            last = self.head[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.drop = Dropout(cfg.dropout)
        self.frozen_table: torch.Tensor | None = None
        nn.init.normal_(self.hist_pos, std=0.02)

    def item_table(self) -> torch.Tensor:
        """(n_items, D) every item's id embedding + side-feature embedding.

        Computed once per forward (the catalogue is small next to B x (L + H) lookups); ``freeze`` bakes it
        into a constant for export, so the served graph does one Gather per item.
        """
        if self.frozen_table is not None:
            return self.frozen_table
        table = self.item_emb.weight
        if self.cfg.item_field_sizes:
            tokens = [getattr(self, f"item_field_{i}") for i in range(len(self.cfg.item_field_sizes))]
            table = table + self.item_fields(tokens)
        return table

    def freeze(self) -> Reranker:
        """Eval mode with the item table baked in (for export and serving; training must not use it)."""
        self.eval()
        with torch.no_grad():
            self.frozen_table = None
            self.frozen_table = self.item_table().detach().clone()
        return self

    @property
    def late_score(self) -> bool:
        """True when the score enters after the candidate encoder, so ``encode`` does not read it."""
        return self.cfg.pathway not in EARLY_PATHWAYS

    def user_state(self, table: torch.Tensor, history: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """(B, H), (B, F) -> (B, D): profile embedding joined with a pooled transformer over the history."""
        valid = history > 0  # (B, H)
        if self.cfg.history:
            h = table[history] + self.hist_pos[None, -history.shape[1] :]
            bias = (~valid).float() * NEG_INF
            for block in self.hist_blocks:
                h = block(h, bias)
            pooled = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        else:
            # 0 x (a sum over the input) keeps the input in the exported graph, whatever its width (even 0).
            pooled = torch.zeros(history.shape[0], self.cfg.hidden, device=history.device) + 0.0 * valid.sum(
                -1, keepdim=True)
        if self.cfg.user_field_sizes and self.cfg.side_features:
            prof = self.user_fields([profile[:, i : i + 1] for i in range(len(self.cfg.user_field_sizes))])
        else:
            prof = torch.zeros_like(pooled) + 0.0 * profile.sum(-1, keepdim=True)
        return self.user_proj(torch.cat([pooled, prof], dim=-1))

    def encode(self, items: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, history: torch.Tensor,
               profile: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, L, D): each candidate after the candidate encoder. Reads ``scores`` only on an early pathway."""
        return self.encode_with_state(items, scores, mask, history, profile, positions)[0]

    def encode_with_state(self, items: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, history: torch.Tensor,
                          profile: torch.Tensor, positions: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode``'s (B, L, D) output with the (B, D) user state and (B, L, D) candidate embeddings it read,
        so DNR's generator can condition on them without a second pass over the history."""
        table = self.item_table()
        user = self.user_state(table, history, profile)
        candidates = table[items]
        x = candidates + user[:, None]
        if self.cfg.positions:
            x = x + self.pos_emb(positions)
        s = self.score_feature(scores, mask)[..., None]  # (B, L, 1)
        if self.cfg.pathway == "concat":
            x = self.score_join(torch.cat([x, self.score_mlp(s)], dim=-1))
        elif self.cfg.pathway == "add":
            x = x + self.score_mlp(s)
        elif self.cfg.pathway == "weight":
            x = x * (1.0 + torch.tanh(self.score_mlp(s)))
        x = self.drop(x)
        bias = (~mask).float() * NEG_INF
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x), user, candidates

    def score_input(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) what a score pathway reads: the raw score (the residual pathway: its logit), or the logit
        standardised within each list (``score_input`` list). Pure: no dropout, no parameters."""
        if self.cfg.score_input == "raw":
            return score_logit(scores) if self.cfg.pathway == "residual" else scores
        return list_standardised(score_logit(scores), mask)

    def score_feature(self, scores: torch.Tensor, mask: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """``score_input``, blanked for ``score_dropout`` of the lists in training when ``drop``."""
        feature = self.score_input(scores, mask)
        if drop and self.training and self.cfg.score_dropout > 0:
            # A list without its score must be ranked from the items and the user alone, so the encoder keeps
            # learning after the score has explained what it can.
            feature = feature * (torch.rand(feature.shape[0], 1, device=feature.device) >= self.cfg.score_dropout)
        return feature

    def score_logits(self, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, drop: bool = True
                     ) -> torch.Tensor:
        """(B, L) logits from encoded candidates ``h`` and ``scores`` (read here on a late pathway only);
        ``drop`` False: no score dropout (DNR's synthetic scores are never blanked)."""
        s = self.score_feature(scores, mask, drop)[..., None]
        if self.cfg.pathway == "late":
            h = torch.cat([h, self.score_mlp(s)], dim=-1)
        logits = self.head(h).squeeze(-1)
        if self.cfg.pathway == "residual":
            logits = logits + self.score_scale * s.squeeze(-1) + self.score_bias
        return logits.masked_fill(~mask, MASKED_LOGIT)

    def forward(self, items: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, history: torch.Tensor,
                profile: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L). ``positions`` defaults to each candidate's rank by ``scores`` among the real
        candidates (ties: lower index first), so callers may send candidates in any order; DNR training
        passes the real retriever positions while ``scores`` carries synthetic ones."""
        if positions is None:
            positions = retriever_positions(scores, mask)
        return self.score_logits(self.encode(items, scores, mask, history, profile, positions), scores, mask)


def score_logit(scores: torch.Tensor) -> torch.Tensor:
    """log(s / (1 - s)) with s clamped to [eps, 1 - eps]."""
    p = scores.clamp(SCORE_EPS, 1.0 - SCORE_EPS)
    return torch.log(p) - torch.log(1.0 - p)


def list_standardised(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ``x`` minus its mean over each list's real candidates, over their std; 0 on padding."""
    m = mask.to(x.dtype)
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(-1, keepdim=True) / n
    centred = (x - mean) * m
    std = torch.sqrt((centred * centred).sum(-1, keepdim=True) / n + 1e-6)
    return centred / std


def retriever_positions(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) rank of each candidate by descending score, real candidates first, ties by index.

    rank_i = #{j : key_j > key_i} + #{j < i : key_j = key_i}, with padding keyed below every score. A
    pairwise count (L^2 comparisons) rather than a sort: exact on ties and exported as plain ONNX ops.
    """
    key = torch.where(mask, scores.float(), torch.full_like(scores, -2.0))
    n = key.shape[1]
    ki, kj = key[:, :, None], key[:, None, :]  # (B, L, 1), (B, 1, L)
    earlier = torch.ones(n, n, dtype=torch.bool, device=key.device).tril(-1)  # j < i
    beats = (kj > ki) | ((kj == ki) & earlier[None])
    return beats.sum(-1)

"""The textbook GPT: the plain path the fast model is measured and tested against.

Same architecture and the same parameter names as `gptpkg.model.GPT` (so one state
dict loads into either), but written the way the book writes it: attention scores
materialised and masked with a stored causal mask, LayerNorm and tanh-GELU by hand,
the full (B, T, V) logits then `F.cross_entropy`. No SDPA, no fused kernels, no
chunked loss. Used by `bench/train_throughput.py` and the equivalence tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import IGNORE_INDEX
from .model import GPT, MLP, CausalSelfAttention, GPTClassifier, KVCache
from .presets import ModelConfig


class PlainLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias


def plain_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class PlainAttention(CausalSelfAttention):
    """The same projections; scores materialised and masked by hand instead of SDPA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.attn_drop = nn.Dropout(cfg.drop_rate)
        ctx = cfg.context_length
        # (ctx, ctx) True above the diagonal: the future a query must not see.
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1), persistent=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if cache is not None:
            raise ValueError("the reference model has no KV cache; use gptpkg.model.GPT")
        B, T, C = x.shape
        D = C // self.n_heads
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        scores = q @ k.transpose(2, 3) / math.sqrt(D)  # (B, H, T, T)
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
        weights = self.attn_drop(torch.softmax(scores, dim=-1))
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class PlainMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(plain_gelu(self.fc(x))))


class ReferenceGPT(GPT):
    """`GPT` with every block, norm and the loss swapped for the textbook versions.

    `ReferenceGPT(cfg).load_state_dict(GPT(cfg).state_dict())` gives the same function.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        for block in self.blocks:
            block.norm1 = PlainLayerNorm(cfg.emb_dim)
            block.attn = PlainAttention(cfg)
            block.norm2 = PlainLayerNorm(cfg.emb_dim)
            block.mlp = PlainMLP(cfg)
        self.final_norm = PlainLayerNorm(cfg.emb_dim)
        self.apply(self._init_weights)

    def next_token_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.out_head(h)[..., : self.cfg.vocab_size]  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def reference_copy(model: GPT | GPTClassifier) -> ReferenceGPT | GPTClassifier:
    """A `ReferenceGPT` holding the same weights as `model` (same device and dtype); for
    a classifier, a classifier around one."""
    if isinstance(model, GPTClassifier):
        ref = GPTClassifier(ReferenceGPT(model.cfg), model.n_classes)
        ref.set_logit_offset(model.logit_offset)
    else:
        ref = ReferenceGPT(model.cfg)
    ref.load_state_dict(model.state_dict())
    p = next(model.parameters())
    return ref.to(device=p.device, dtype=p.dtype)

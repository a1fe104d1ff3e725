"""A GPT-2 model that can hold OpenAI's weights exactly.

Read top to bottom: the KV caches, the leaf modules (attention, MLP), the block, the
language model `GPT`, then the classifier built around it (`GPTClassifier`). The losses
live in `gptpkg.losses`.
Shapes: B batch, T sequence length, C = emb_dim, H heads, D = C / H head size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import head_cross_entropy
from .presets import ModelConfig


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer.

    Each tensor is (B, H, T_seen, D); decoding appends one position per step (the
    tensors grow, so every step has new shapes).
    """

    def __init__(self, n_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Positions cached by every layer (read before a forward pass starts)."""
        return self.seen(len(self.layers) - 1)

    def seen(self, i: int) -> int:
        past = self.layers[i]
        return 0 if past is None else past[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[i]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.layers[i] = (k, v)
        return k, v

    def positions(self, T: int, device: torch.device, limit: int) -> torch.Tensor:
        """The positions (T,) of the next T tokens; at most `limit` positions in all."""
        past = self.length
        if past + T > limit:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's context_length {limit}")
        return torch.arange(past, past + T, device=device)

    def attend(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Layer i's new keys and values (B, H, T, D) in; (keys, values, attn_mask,
        is_causal) for SDPA over every position seen out."""
        past = self.seen(i)
        T = k.shape[2]
        k, v = self.update(i, k, v)
        # Without history a plain causal mask is right for any T (T=1 sees itself). Not
        # `and T > 1`: that makes a symbolic bool under torch.export (ONNX dynamic T).
        if past > 0 and T > 1:
            # Queries at positions past..past+T-1 see keys 0..their own position.
            q_pos = torch.arange(past, past + T, device=k.device)[:, None]
            return k, v, torch.arange(past + T, device=k.device)[None, :] <= q_pos, False
        return k, v, None, past == 0

    def advance(self, T: int) -> None:
        """After a forward pass over T tokens (the cached tensors already say so)."""


class StaticKVCache:
    """Keys and values in buffers allocated once, (B, H, max_len, D) per layer, written in
    place at the positions `pos` (a device tensor) names; attention runs over the whole
    buffer with the positions not yet written masked out. Every decode step then has the
    same shapes and reads and writes the same memory, which is what a compiled decode step
    and CUDA graphs need. `model(idx, cache=cache)` advances `pos` by T, as it grows a KVCache.
    Outputs equal KVCache's up to float rounding (masked keys weigh exactly 0)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_len = max_len or cfg.context_length
        if not 0 < max_len <= cfg.context_length:
            raise ValueError(f"max_len must be in 1..context_length={cfg.context_length}, got {max_len}")
        D = cfg.emb_dim // cfg.n_heads
        shape = (batch_size, cfg.n_heads, max_len, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # the next position to write
        self.slots = torch.arange(max_len, device=device)
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (for torch._dynamo.mark_static_address)."""
        return [*self.keys, *self.values, self.pos, self.slots]

    def reset(self) -> None:
        """Start over at position 0 (older keys stay in memory, masked)."""
        self.pos.zero_()

    def positions(self, T: int, device: torch.device, limit: int) -> torch.Tensor:
        # No host check here (it would read the device): `generate` keeps the count.
        return self.pos + torch.arange(T, device=device)

    def attend(self, i: int, k: torch.Tensor, v: torch.Tensor):
        at = self.pos + torch.arange(k.shape[2], device=k.device)  # (T,)
        self.keys[i].index_copy_(2, at, k.to(self.dtype))
        self.values[i].index_copy_(2, at, v.to(self.dtype))
        mask = self.slots[None, :] <= at[:, None]  # (T, max_len): each query sees up to itself
        return self.keys[i].to(k.dtype), self.values[i].to(v.dtype), mask, False

    def advance(self, T: int) -> None:
        self.pos += T


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        # One fused projection for q, k, v (the layout of OpenAI's c_attn).
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | StaticKVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, True
        if cache is not None:
            k, v, mask, is_causal = cache.attend(layer, k, v)
        # SDPA picks the flash / memory-efficient kernel where it can; no stored mask.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.drop_rate if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU; exact GELU would not match its weights.
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | StaticKVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once (a tied head shares the embedding's)."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


class GPT(nn.Module):
    """The language model: token ids (B, T) -> next-token logits (B, T, vocab_size), or
    with targets the mean next-token loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(V, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        # None once a classifier is built around this model (`GPTClassifier`).
        self.out_head: nn.Linear | None = nn.Linear(cfg.emb_dim, V, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers), since each block
        # adds two of them to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def tied(self) -> bool:
        return self.out_head is not None and self.out_head.weight is self.tok_emb.weight

    def num_params(self, trainable_only: bool = False) -> int:
        return count_params(self, trainable_only)

    def hidden(self, idx: torch.Tensor, cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final-normed hidden states (B, T, C)."""
        B, T = idx.shape
        if cache is None:
            if idx.shape[1] > self.cfg.context_length:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context_length {self.cfg.context_length}")
            pos = torch.arange(T, device=idx.device)
        else:
            pos = cache.positions(T, idx.device, self.cfg.context_length)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size).

        With `targets` (B, T): the mean next-token cross-entropy instead (-100 ignored),
        computed here so that the head and the loss can be fused and so that wrappers
        that hook `forward` (DDP, torch.compile) see every training step.
        """
        if self.out_head is None:
            raise ValueError("this GPT is a classifier's backbone: its LM head was dropped")
        h = self.hidden(idx, cache)
        if targets is not None:
            return self.next_token_loss(h, targets)
        logits = self.out_head(h)
        if logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]  # drop the padded vocabulary rows
        return logits

    def next_token_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of hidden states h (B, T, C) against targets
        (B, T) (`losses.head_cross_entropy`: fused and chunked on CPU)."""
        w = self.out_head.weight
        if w.shape[0] != self.cfg.vocab_size:
            w = w[: self.cfg.vocab_size]  # padded rows never score (sliced only then: a
            # slice's backward copies the whole (V, C) gradient)
        return head_cross_entropy(h, w, targets)

    def set_drop_rate(self, p: float) -> None:
        """Use dropout probability `p` from now on, everywhere the model drops (embeddings,
        attention weights, residual branches); `cfg.drop_rate` says so, and so does the
        config a checkpoint of this model saves."""
        self.cfg = self.cfg.replace(drop_rate=p)  # validates p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.drop_rate = p


class GPTClassifier(nn.Module):
    """A text classifier built around a GPT backbone: the backbone's hidden state at each
    text's last real token, through its own head Linear(C, n_classes).

    Building it drops the backbone's LM head (`backbone.out_head` becomes None): a tied
    head's embedding then trains untied, as the classifier's alone. `logit_offset`, one
    number per class or None, is a decision rule added to every result after training
    (`set_logit_offset`); it is no weight, and checkpoints record it beside the weights.
    """

    def __init__(self, backbone: GPT, n_classes: int) -> None:
        super().__init__()
        backbone.out_head = None
        self.backbone = backbone
        self.n_classes = n_classes
        head = nn.Linear(backbone.cfg.emb_dim, n_classes)
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(head.bias)
        self.head = head.to(backbone.tok_emb.weight.device)
        self.logit_offset: tuple[float, ...] | None = None

    @property
    def cfg(self) -> ModelConfig:
        return self.backbone.cfg

    def num_params(self, trainable_only: bool = False) -> int:
        return count_params(self, trainable_only)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes) of each row's hidden state at its last real token.

        `idx` (B, T) is right-padded; `lengths` (B,) counts the real tokens. Causal
        attention means padding after a token cannot change it, so a text's logits do not
        depend on what it is batched with. Only the B pooled rows go through the head.
        """
        h = self.backbone.hidden(idx)  # (B, T, C)
        lengths = lengths.to(idx.device).clamp(min=1)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        logits = self.head(pooled)
        if self.logit_offset is not None:
            logits = logits + torch.tensor(self.logit_offset, dtype=logits.dtype, device=logits.device)
        return logits

    def set_logit_offset(self, offset) -> None:
        """Add `offset` (one finite number per class) to every result from now on; None
        removes it. A shift of the spam logit by d moves the decision threshold on the
        unshifted spam probability from 0.5 to 1 / (1 + e^d). Setting (not adding) makes
        it idempotent; checkpoints save it, so the ONNX export carries it."""
        if offset is None:
            self.logit_offset = None
            return
        values = tuple(float(v) for v in offset)
        if len(values) != self.n_classes:
            raise ValueError(f"logit_offset: expected {self.n_classes} values (one per class), got {list(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"logit_offset: expected finite numbers, got {list(values)}")
        self.logit_offset = values

    def set_drop_rate(self, p: float) -> None:
        """`GPT.set_drop_rate` of the backbone (the head has no dropout)."""
        self.backbone.set_drop_rate(p)

    def set_trainable(self, which: Literal["head", "last_blocks", "all"], n_blocks: int = 1) -> None:
        """Freeze everything except: the head; the head + last `n_blocks` blocks + final
        norm; or nothing ("all")."""
        if which not in ("head", "last_blocks", "all"):
            raise ValueError(f"trainable must be head|last_blocks|all, got {which!r}")
        train_all = which == "all"
        for p in self.parameters():
            p.requires_grad = train_all
        if train_all:
            return
        for p in self.head.parameters():
            p.requires_grad = True
        if which == "last_blocks":
            blocks = self.backbone.blocks
            if not 0 < n_blocks <= len(blocks):
                raise ValueError(f"n_blocks must be in 1..{len(blocks)}, got {n_blocks}")
            for block in blocks[-n_blocks:]:
                for p in block.parameters():
                    p.requires_grad = True
            for p in self.backbone.final_norm.parameters():
                p.requires_grad = True

"""A GPT-2 model that can hold OpenAI's weights exactly.

Read top to bottom: the leaf modules (attention, MLP), the block, then the model.
Shapes: B batch, T sequence length, C = emb_dim, H heads, D = C / H head size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .presets import ModelConfig

IGNORE_INDEX = -100  # targets equal to this are not scored (padding, masked prompts)


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
    and CUDA graphs need. `model(idx, cache)` advances `pos` by T, as it grows a KVCache.
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


# Rows of hidden states per chunk of the fused head + loss: a (V, rows) slab of logits
# at a time instead of (B*T, V): 256 x 50,257 fp32 logits are ~50 MB, not ~400 MB.
HEAD_CHUNK_ROWS = 256


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean next-token cross-entropy of `h @ w.T`, computed `chunk` rows at a time.

    The gradients are formed in the forward pass, chunk by chunk (softmax - one-hot is
    the gradient of the logits), so the full (N, V) logits and their gradient never
    exist at once. Same three matmuls as the plain head, but vocabulary-major: each
    chunk's logits are computed as `w @ h.T` (V, n) into one buffer reused by every
    chunk, then `grad_h = g.T @ w` and `grad_w += g @ h`. On a CPU that layout runs the
    head's matmuls near the machine's peak, where `h @ w.T` into a fresh (n, V) tensor
    runs at about half of it (bench/train_throughput.py); it also saves the memory
    traffic of two (N, V) fp32 tensors and separate log-softmax passes over them.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int, want_grad: bool):
        # h (N, C), w (V, C), targets (N,)
        N, V = h.shape[0], w.shape[0]
        denom = max(int((targets != IGNORE_INDEX).sum()), 1)
        need_grad = want_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.empty_like(h) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        buf = torch.empty((V, min(chunk, N)), dtype=torch.result_type(h, w), device=h.device)
        for s in range(0, N, chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            n = hc.shape[0]
            vc = tc != IGNORE_INDEX
            safe = torch.where(vc, tc, torch.zeros_like(tc))
            cols = torch.arange(n, device=h.device)
            logits = buf[:, :n] if n == buf.shape[1] else torch.empty((V, n), dtype=buf.dtype, device=h.device)
            torch.mm(w, hc.t(), out=logits)  # (V, n)
            logits = logits.float()
            picked = logits[safe, cols]  # (n,)
            # In place, one pass each: shift by the column max, exponentiate, sum.
            top = logits.amax(dim=0)  # (n,)
            e = logits.sub_(top).exp_()
            z = e.sum(dim=0)  # (n,)
            total += ((z.log() + top - picked) * vc).sum()
            if not need_grad:
                continue
            # d(mean loss)/d logits = (softmax - onehot) / n_valid on valid rows, else 0.
            keep = vc.to(e.dtype) / denom
            g = e.mul_(keep / z)
            g[safe, cols] -= keep
            g = g.to(w.dtype)
            if grad_h is not None:
                torch.mm(g.t(), w, out=grad_h[s : s + n])
            if ctx.needs_input_grad[1]:
                # First chunk writes (no zero fill of a (V, C) buffer), later ones add.
                grad_w = g @ hc if grad_w is None else grad_w.addmm_(g, hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # The loss is usually backpropagated as is (grad_out == 1): skip two full passes.
        one = grad_out.device.type == "cpu" and grad_out.item() == 1.0
        gh = None if grad_h is None or not ctx.needs_input_grad[0] else grad_h if one else grad_h * grad_out
        gw = None if grad_w is None or not ctx.needs_input_grad[1] else grad_w if one else grad_w * grad_out
        return gh, gw, None, None, None


def chunked_head_loss(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int = HEAD_CHUNK_ROWS
) -> torch.Tensor:
    """Mean cross-entropy of logits `h @ w.T` (h (N, C), w (V, C), targets (N,),
    -100 ignored) without materialising the (N, V) logits."""
    return _ChunkedHeadLoss.apply(h, w, targets, chunk, torch.is_grad_enabled())


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(V, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, V, bias=False)
        self.n_classes: int | None = None  # set by `to_classifier`
        # Added to the class logits at every `classify` (set by `set_logit_offset`, after
        # training): a decision rule, not a weight; None = none.
        self.logit_offset: tuple[float, ...] | None = None
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
        return self.out_head.weight is self.tok_emb.weight

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters counted once (a tied head shares the embedding's)."""
        seen = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in seen.values())

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
        cache: KVCache | StaticKVCache | None = None,
        targets: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size), or (B, T, n_classes) for a classifier.

        With `targets` (B, T): the mean next-token cross-entropy instead (-100 ignored).
        With `lengths` (B,): `classify`. Both go through `forward` so that wrappers that
        hook it (DDP, torch.compile) see every training step.
        """
        if lengths is not None:
            return self.classify(idx, lengths)
        h = self.hidden(idx, cache)
        if targets is not None and self.n_classes is None:
            return self.lm_loss(h, targets)
        logits = self.out_head(h)
        if self.n_classes is None and logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]  # drop the padded vocabulary rows
        if targets is not None:
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits

    def lm_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of hidden states h (B, T, C).

        On CPU the head and the loss are fused and chunked (`chunked_head_loss`). On
        GPUs the plain logits path is kept: torch.compile fuses it there, and bf16
        autocast applies to the head matmul.
        """
        w = self.out_head.weight
        if w.shape[0] != self.cfg.vocab_size:
            w = w[: self.cfg.vocab_size]  # padded rows never score (sliced only then: a
            # slice's backward copies the whole (V, C) gradient)
        if h.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return chunked_head_loss(h.flatten(0, 1), w, targets.flatten())
        logits = F.linear(h, w)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def classify(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes) of each row's hidden state at its last real token.

        `idx` is right-padded; `lengths` (B,) counts the real tokens. Causal attention
        means padding after a token cannot change it, so a text's logits do not depend
        on what it is batched with. Only the B pooled rows go through the head.
        """
        h = self.hidden(idx)  # (B, T, C)
        lengths = lengths.to(idx.device).clamp(min=1)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        logits = self.out_head(pooled)
        if self.logit_offset is not None:
            logits = logits + torch.tensor(self.logit_offset, dtype=logits.dtype, device=logits.device)
        return logits

    # -- fine-tuning surgery -----------------------------------------------------

    def to_classifier(self, n_classes: int) -> GPT:
        """Swap the LM head for a fresh Linear(C, n_classes) (unties it)."""
        head = nn.Linear(self.cfg.emb_dim, n_classes)
        nn.init.normal_(head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(head.bias)
        self.out_head = head.to(self.tok_emb.weight.device)
        self.n_classes = n_classes
        self.logit_offset = None
        return self

    def set_logit_offset(self, offset) -> None:
        """Add `offset` (one finite number per class) to every `classify` result from now
        on; None removes it. A shift of the spam logit by d moves the decision threshold on
        the unshifted spam probability from 0.5 to 1 / (1 + e^d). Setting (not adding)
        makes it idempotent; checkpoints save it, so the ONNX export carries it."""
        if offset is None:
            self.logit_offset = None
            return
        values = tuple(float(v) for v in offset)
        if self.n_classes is None or len(values) != self.n_classes:
            raise ValueError(
                f"logit_offset: expected {self.n_classes} values (one per class) of a classifier, got {list(values)}"
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"logit_offset: expected finite numbers, got {list(values)}")
        self.logit_offset = values

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
        for p in self.out_head.parameters():
            p.requires_grad = True
        if which == "last_blocks":
            if not 0 < n_blocks <= len(self.blocks):
                raise ValueError(f"n_blocks must be in 1..{len(self.blocks)}, got {n_blocks}")
            for block in self.blocks[-n_blocks:]:
                for p in block.parameters():
                    p.requires_grad = True
            for p in self.final_norm.parameters():
                p.requires_grad = True

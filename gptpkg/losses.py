"""The losses: next-token cross-entropy (with the fused, chunked head + loss used on CPU)
and the classifier's cross-entropy, plus the two loss functions `fit` trains with.

Shapes: B batch, T sequence length, N = B * T rows, C = emb_dim, V vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are not scored (padding, masked prompts)

# A loss function maps (model, batch) to (mean loss, number of tokens in the batch).
LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, int]]

# Rows of hidden states per chunk of the fused head + loss: a (V, rows) slab of logits
# at a time instead of (B*T, V): 256 x 50,257 fp32 logits are ~50 MB, not ~400 MB.
HEAD_CHUNK_ROWS = 256


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean next-token cross-entropy of `h @ w.T`, computed `chunk` rows at a time.

    The gradients are formed in the forward pass, chunk by chunk (softmax - one-hot is
    the gradient of the logits), so the full (N, V) logits and their gradient never
    exist at once. Same three matmuls as the plain head, but vocabulary-major: each
    chunk's logits are computed as `w @ h.T` (V, n) into one buffer reused by every
    chunk, then `grad_h = g.T @ w` and `grad_w += g @ h`. On a CPU that layout keeps the
    head's matmuls near the machine's peak, where `h @ w.T` into a fresh (n, V) tensor
    does not (bench/train_throughput.py measures both); it also saves the memory traffic
    of two (N, V) fp32 tensors and separate log-softmax passes over them.
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


def head_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits `h @ w.T`: hidden states h (B, T, C),
    head weight w (V, C), targets (B, T) with -100 ignored.

    On CPU without autocast the head and the loss are fused and chunked
    (`chunked_head_loss`). Elsewhere the plain logits path is kept: on GPUs
    torch.compile fuses it, and bf16 autocast applies to the head matmul.
    """
    if h.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return chunked_head_loss(h.flatten(0, 1), w, targets.flatten())
    logits = F.linear(h, w)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def class_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Mean cross-entropy of class logits (B, n_classes) against labels (B,), each class
    weighted by `class_weights` (None: equally)."""
    w = None if class_weights is None else torch.tensor(class_weights, device=logits.device)
    return F.cross_entropy(logits.float(), labels, weight=w)


# ---------------------------------------------------------------------------------
# The loss functions `fit` takes. Both call the model itself, so that wrappers that hook
# `forward` (DDP, torch.compile) see every training step.


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; targets equal to -100 are ignored. The model computes
    it (`GPT.forward(idx, targets=...)`), so the head and loss can be fused."""
    loss = model(batch["input_ids"], targets=batch["targets"])
    return loss, batch["input_ids"].numel()


def classification_loss(class_weights: Sequence[float] | None = None) -> LossFn:
    """Cross-entropy on the class logits of each text's last real token
    (`GPTClassifier.forward(idx, lengths)`)."""

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        logits = model(batch["input_ids"], batch["lengths"])  # (B, n_classes)
        return class_cross_entropy(logits, batch["labels"], class_weights), batch["input_ids"].numel()

    return loss_fn

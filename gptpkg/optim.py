"""AdamW for a row-sparse token embedding, and gradient clipping that accepts it.

Fine-tuning a classifier unties the token embedding from the head, so the embedding's
gradient touches only the rows of tokens in the batch: a few hundred of 50,257. Dense
AdamW still zero-fills, clips and updates every row, the largest per-step cost of a
bucketed CPU classifier step once padding is gone (measured with
bench/finetune_batching.py --dense-embedding-too: docs/performance.md).

`RowSparseAdamW` gives the same result as `torch.optim.AdamW` while touching only the
rows that ever had a gradient. For a row that never had one, both moments are zero,
so AdamW's update is 0 / (0 + eps) = 0 and the row only decays, `p *= 1 - lr * wd`,
by the same factor as every other such row. That decay is owed, and paid just before
a forward pass reads the row (a hook on the embedding), or by `flush()` (before every
eval and checkpoint, and at the end of training). Rows that have had a gradient are
updated every step, exactly as AdamW does, since their moments keep decaying.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from .errors import GptpkgError


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) for 2-D parameters whose
    gradients are sparse COO tensors over rows (`nn.Embedding(sparse=True)`); dense
    gradients are taken too (every row then counts as touched).
    Rows "touched" are those that have had a gradient at some step.

    Untouched rows owe the decay since their `stamp` (the running product of decay
    factors when they were last brought up to date). `watch(embedding)` brings the rows
    a forward pass is about to read up to date first, so the model always computes with
    AdamW's weights; `flush()` brings every row up to date.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowSparseAdamW takes 2-D (rows, dim) parameters, got shape {tuple(p.shape)}")

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = 0
            # Moments of touched rows, packed: slot i holds row rows_by_slot[i], so the
            # update reads and writes them without a gather or scatter. Zeros, not empty:
            # unused slots are saved in trainer.pt too, which must not hold stale memory.
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["slot"] = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
            st["rows_by_slot"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
            st["n_touched"] = 0
            st["decay"] = 1.0  # product of every step's 1 - lr * wd so far
            st["stamp"] = torch.ones(p.shape[0], dtype=torch.float64, device=p.device)
        return st

    @torch.no_grad()
    def _bring_up_to_date(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        """Apply to untouched `rows` of `p` the decay they owe."""
        st = self._state(p)
        rows = rows[st["slot"][rows] < 0]
        if rows.numel() and st["decay"] != 1.0:
            owed = st["decay"] / st["stamp"][rows]
            p[rows] = p[rows] * owed.to(p.dtype).unsqueeze(1)
            st["stamp"][rows] = st["decay"]

    def watch(self, embedding: nn.Embedding):
        """Before each forward of `embedding`, bring the rows it reads up to date.
        Returns the hook handle (`.remove()` it when training ends)."""
        weight = embedding.weight

        def hook(module: nn.Module, args: tuple) -> None:
            self._bring_up_to_date(weight, torch.unique(args[0]))

        return embedding.register_forward_pre_hook(hook)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:  # as AdamW: no gradient, no step
                    continue
                st = self._state(p)
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows, values = torch.arange(p.shape[0], device=p.device), grad
                self._bring_up_to_date(p, rows)  # a no-op for rows a watched forward read
                slot = st["slot"]
                new = rows[slot[rows] < 0]
                n = st["n_touched"]
                if new.numel():
                    slot[new] = torch.arange(n, n + new.numel(), device=p.device)
                    st["rows_by_slot"][n : n + new.numel()] = new
                    n = st["n_touched"] = n + new.numel()
                st["step"] += 1
                t = st["step"]
                live = st["rows_by_slot"][:n]
                # This step's gradient on the touched rows (zero on those without one now).
                g = torch.zeros((n, p.shape[1]), dtype=p.dtype, device=p.device)
                g.index_copy_(0, slot[rows], values.to(p.dtype))
                w, m, v = p.data[live], st["exp_avg"][:n], st["exp_avg_sq"][:n]
                w.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                p.data.index_copy_(0, live, w)
                st["decay"] *= 1 - lr * wd
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row up to date: the weights then equal AdamW's."""
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self._bring_up_to_date(p, torch.arange(p.shape[0], device=p.device))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for st in self.state.values():  # the base class casts every tensor to a float param's dtype
            st["stamp"] = st["stamp"].double()
            st["slot"], st["rows_by_slot"] = st["slot"].long(), st["rows_by_slot"].long()


class OptimizerSet:
    """Several optimizers stepped as one. `fit` sets the learning rate on
    `param_groups`, which lists every member's groups."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def flush(self) -> None:
        for o in self.optimizers:
            flush(o)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "kinds": kinds(self)}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def flush(optimizer) -> None:
    """Bring lazily updated weights up to date (a no-op for other optimizers)."""
    if isinstance(optimizer, (RowSparseAdamW, OptimizerSet)):
        optimizer.flush()


def kinds(optimizer) -> list[str]:
    """The optimizer classes behind `optimizer` (an OptimizerSet's members)."""
    members = optimizer.optimizers if isinstance(optimizer, OptimizerSet) else [optimizer]
    return [type(o).__name__ for o in members]


def load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, with a clear error when the checkpoint was
    written by another optimizer layout (e.g. a dense AdamW run resumed as row-sparse)."""
    saved = list(state.get("kinds", ["AdamW"]))
    if saved != kinds(optimizer):
        raise GptpkgError(
            f"the checkpoint's optimizer state was written by {saved}, this run uses {kinds(optimizer)}; "
            f"resume on the device type, and with the trainable layers, the run started with"
        )
    optimizer.load_state_dict(state)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2, same total norm and factor) that also takes
    sparse gradients; those are coalesced in place first (duplicate rows summed)."""
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())  # shares the coalesced tensor's storage
        else:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


# ---------------------------------------------------------------------------------
# The optimizer `fit` trains with


def param_groups(model: nn.Module, weight_decay: float, exclude: nn.Parameter | None = None) -> list[dict]:
    """Decay matrices (linear and embedding weights) only; not biases or norms. Each
    trainable parameter once (a tied head is the embedding), `exclude` left out."""
    seen, decay, no_decay = {id(exclude)}, [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def row_sparse_embedding(
    model: nn.Module, enabled: bool, device: torch.device, one_process: bool, compiled: bool
) -> nn.Embedding | None:
    """The token embedding to train with row-sparse gradients, or None.

    Only where it pays and is safe: on CPU (GPUs keep fused dense AdamW), in one process
    (DDP would all-reduce a dense gradient anyway), without `torch.compile`, and when the
    embedding is trainable and not tied to the LM head (a tied head's gradient fills
    every row; a classifier's head is its own).
    """
    emb = getattr(getattr(model, "backbone", model), "tok_emb", None)  # a classifier's: its backbone's
    if not enabled or device.type != "cpu" or not one_process or compiled:
        return None
    if not isinstance(emb, nn.Embedding) or not emb.weight.requires_grad:
        return None
    shared = sum(p is emb.weight for _, p in model.named_parameters(remove_duplicate=False))
    return emb if shared == 1 else None


@contextlib.contextmanager
def sparse_gradients(emb: nn.Embedding, optimizer: RowSparseAdamW) -> Iterator[None]:
    """While training: the embedding's gradient is a sparse tensor over the batch's rows,
    and rows owe their decay until a forward pass reads them; on exit every row is paid."""
    was_sparse, emb.sparse = emb.sparse, True
    watch = optimizer.watch(emb)
    try:
        yield
    finally:
        optimizer.flush()
        emb.sparse = was_sparse
        watch.remove()


def make_optimizer(model: nn.Module, cfg, device: torch.device, one_process: bool = True, compiled: bool = False):
    """(optimizer, context to train in). AdamW, fused; where `row_sparse_embedding`
    allows, the token embedding gets `RowSparseAdamW` (same decay) beside it."""
    emb = row_sparse_embedding(model, cfg.sparse_embedding, device, one_process, compiled)
    dense = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, exclude=emb.weight if emb is not None else None),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type in ("cuda", "cpu"),  # one pass over each parameter
    )
    if emb is None:
        return dense, contextlib.nullcontext()
    rows = RowSparseAdamW([emb.weight], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return OptimizerSet(dense, rows), sparse_gradients(emb, rows)

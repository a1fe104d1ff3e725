"""LoRA: low-rank adapters on a GPT's linear layers (Hu et al. 2021), a small module of
our own rather than peft: peft brings transformers and accelerate into the training
path and its own adapter file format, where here the layers are four plain nn.Linear
per block, the checkpoint format is one (gptpkg.checkpoint), and merging for the ONNX
export is one matmul per layer.

`LoRALinear` is an nn.Linear (its weight and bias keep their names and stay frozen) plus
A (r, in) and B (out, r): y = x W^T + b + scale * dropout(x) A^T B^T, scale = alpha / r.
B starts at zero, so an adapted model starts as its base. The gradient never forms the
full (out, in) update, which is what makes a step cheaper than full fine-tuning.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The linear layers of a block that adapters may target, by their names in `model.Block`.
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
ADAPTER_KEYS = ("lora_a", "lora_b")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors: frozen, names kept
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b) * (
            self.scale
        )

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (dropout off): W + scale * B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _gpt(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)  # a GPTClassifier's GPT, or the GPT itself


def _replace(model: nn.Module, fn) -> None:
    for block in _gpt(model).blocks:
        for target in TARGETS:
            parent_name, _, name = target.rpartition(".")
            parent = block.get_submodule(parent_name)
            new = fn(getattr(parent, name), target)
            if new is not None:
                setattr(parent, name, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], base: dict) -> None:
    """Freeze `model` and add adapters to the `targets` layers of every block; a
    classifier's head (new, n_classes x C) trains in full. `base` ({"init", "path",
    "sha256"}) names the weights the adapters sit on; checkpoints record it."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora_targets: expected a non-empty list of {list(TARGETS)}, got {targets}")
    for p in model.parameters():
        p.requires_grad = False
    _replace(model, lambda lin, t: LoRALinear(lin, rank, alpha, dropout) if t in targets else None)
    if hasattr(model, "head"):
        for p in model.head.parameters():
            p.requires_grad = True
    model.adapter = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets), "base": base}


def adapter_of(model: nn.Module) -> dict[str, Any] | None:
    """The adapter description `apply_lora` attached, or None for a model without adapters."""
    return getattr(model, "adapter", None)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint stores: every trainable tensor (A, B, a classifier's head)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its layer, in place: the model becomes a plain GPT (or
    classifier) computing the same function, which is what the ONNX export writes."""
    _replace(model, lambda lin, t: lin.merged() if isinstance(lin, LoRALinear) else None)
    if hasattr(model, "adapter"):
        del model.adapter


@torch.no_grad()
def average_adapters(target: nn.Module, members: list[nn.Module]) -> None:
    """Load into `target` the uniform soup of `members` (fine-tunings of one base, each
    with adapters): the mean of the updates B_i A_i is exactly one adapter of rank n*r,
    A = [A_1; ...; A_n], B = [B_1 ... B_n] / n; the heads are averaged."""
    n = len(members)
    layers = [dict(m.named_modules()) for m in members]
    for name, mod in list(target.named_modules()):
        if isinstance(mod, LoRALinear):
            mod.lora_a = nn.Parameter(torch.cat([ms[name].lora_a for ms in layers], 0))
            mod.lora_b = nn.Parameter(torch.cat([ms[name].lora_b for ms in layers], 1) / n)
    if hasattr(target, "head"):
        for key, p in target.head.state_dict().items():
            p.copy_(torch.stack([m.head.state_dict()[key] for m in members]).mean(0))


def resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each adapter of `model` the rank its tensors in `state` have (a soup's is n*r),
    so that `load_state_dict(state)` fits."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear) and f"{name}.lora_a" in state:
            r = state[f"{name}.lora_a"].shape[0]
            if r != mod.lora_a.shape[0]:
                mod.lora_a = nn.Parameter(mod.lora_a.new_zeros(r, mod.in_features))
                mod.lora_b = nn.Parameter(mod.lora_b.new_zeros(mod.out_features, r))

"""What both fine-tunings share: the model they start from, and their run plan (batches)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch.nn.functional as F

from .config import ConfigError
from .data import IGNORE_INDEX, PAD_ID
from .model import GPT
from .presets import model_config
from .train import RunPlan, batch_plan_for, plan_run


def initial_model(cfg, section: str, paths) -> GPT:
    """The model a fine-tuning (`cfg`: its params section) starts from: our pretrained
    checkpoint, OpenAI's GPT-2 weights (the weights stage's), or (classifier only) a fresh preset, with
    the section's `drop_rate` (None keeps the start's: the pretraining drop_rate, 0 for
    OpenAI's weights, the preset's for scratch). Its context must hold `max_length`."""
    from pathlib import Path

    from .checkpoint import load_checkpoint

    if cfg.init == "pretrained":
        model, _ = load_checkpoint(paths.pretrained)
    elif cfg.init == "openai":
        if not (Path(paths.openai_weights) / "config.json").is_file():
            raise ConfigError(
                f"params.{section}.init: openai reads OpenAI's GPT-2 from {paths.openai_weights}, which lacks "
                f"config.json: run the weights stage first (`gptpkg weights`, or `dvc repro`)"
            )
        from .hf_weights import load_openai_gpt2

        model = load_openai_gpt2(paths.openai_weights)
    else:
        model = GPT(model_config(cfg.model))
    if cfg.drop_rate is not None:
        model.set_drop_rate(float(cfg.drop_rate))
    if cfg.max_length > model.cfg.context_length:
        raise ConfigError(
            f"params.{section}.max_length={cfg.max_length} exceeds the start model's context_length "
            f"{model.cfg.context_length}"
        )
    return model


def start_reference(cfg, paths) -> dict:
    """What an adapter trained from this section's start model records of its base: the
    init, the folder and the sha256 of its weights file."""
    from pathlib import Path

    from .raw import sha256_of

    if cfg.init == "openai":
        from .hf_weights import weights_file

        folder, weights = paths.openai_weights, weights_file(paths.openai_weights)
    elif cfg.init == "pretrained":
        folder = paths.pretrained
        weights = Path(folder) / "model.safetensors"
    else:
        raise ConfigError(f"{cfg.init!r} start: trainable: lora needs a pretrained base (init: pretrained or openai)")
    return {"init": cfg.init, "path": str(folder), "sha256": sha256_of(weights)}


def set_trainable(model, cfg, section: str, paths) -> None:
    """What trains, as the section's `trainable` says: lora freezes the start model and
    adds adapters (`lora_*` keys; a classifier's head trains in full); head, last_blocks
    and all are the classifier's `set_trainable`; all trains everything."""
    if cfg.trainable == "lora":
        from .lora import apply_lora

        try:
            apply_lora(
                model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, start_reference(cfg, paths)
            )
        except ValueError as e:
            raise ConfigError(f"params.{section}.{e}") from None
    elif hasattr(model, "set_trainable"):
        model.set_trainable(cfg.trainable, getattr(cfg, "n_blocks", 1))


# Compiled fine-tunings pad every batch's length up to a multiple of this: with one
# graph whose batch and length dimensions are dynamic, no batch is 1 token long (which
# torch.compile would specialize on), and the matmuls get tile-friendly sizes.
LENGTH_MULTIPLE = 8


def finetune_plan(cfg, model: GPT, train_set, collate: Callable) -> RunPlan:
    """The run plan of a fine-tuning (`cfg`: its params section; `train_set[i]["input_ids"]`
    the token ids of item i), batched as the section's `batching` says: `bucketed` groups
    similar lengths; `shuffled` draws random batches padded to their longest; `pad_longest`
    (the book's) pads every example to the longest in the training set. Where the plan
    compiles, each batch is padded further to a multiple of LENGTH_MULTIPLE tokens (at
    most `max_length`): padding after the last real token changes no result (causal
    attention, last-token pooling, ignored targets)."""
    lengths = [len(train_set[i]["input_ids"]) for i in range(len(train_set))]
    if cfg.batching == "pad_longest":
        collate = partial(collate, pad_to=max(lengths))
    batches = batch_plan_for(cfg.batching, lengths, cfg.batch_size, cfg.seed)
    plan = plan_run(cfg, model, train_set, collate, batches, dynamic=True)
    if not plan.compiled:
        return plan
    return replace(plan, collate=partial(padded_to_multiple, collate, LENGTH_MULTIPLE, cfg.max_length))


def padded_to_multiple(collate: Callable, multiple: int, max_length: int, items: list) -> dict:
    """`collate(items)` with `input_ids` (B, T) right-padded with the end token, and
    `targets` (if any) with the ignored index, to T rounded up to `multiple` (capped at
    max(T, max_length))."""
    batch = collate(items)
    T = batch["input_ids"].shape[1]
    want = min(-(-T // multiple) * multiple, max(T, max_length))
    if want == T:
        return batch
    fill = {"input_ids": PAD_ID, "targets": IGNORE_INDEX}
    return {
        k: F.pad(v, (0, want - T), value=fill[k]) if k in fill else v  # (B, T) -> (B, want)
        for k, v in batch.items()
    }

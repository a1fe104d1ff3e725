"""The `pretrain` stage: next-token training of a GPT on the chosen corpus."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..config import PretrainConfig
from ..data import TokenWindows
from ..generate import generate_text
from ..model import GPT
from ..perf import training_mfu
from ..prepared import read_corpus
from ..train import Task, batches_of, fit, lm_loss, mean_loss, plan_run, set_seed


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def run(cfg: PretrainConfig, ctx) -> dict[str, Any]:
    from ..tokenizer import get_tokenizer

    paths = ctx.paths
    train_set = TokenWindows(read_corpus(paths, cfg.corpus, "train"), cfg.max_length, cfg.stride)
    val_set = TokenWindows(read_corpus(paths, cfg.corpus, "val"), cfg.max_length, cfg.max_length)
    tok = get_tokenizer(ctx.mirror)

    set_seed(cfg.seed)
    model = GPT(cfg.architecture())
    plan = plan_run(cfg, model, train_set, _collate)
    device, dtype = plan.device, plan.dtype
    val_batches = batches_of(val_set, _collate, cfg.batch_size)
    initial_val = mean_loss(model.to(device), val_batches, lm_loss, device, cfg.eval_batches, dtype)
    samples: list[dict[str, Any]] = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        val = mean_loss(m, val_batches, lm_loss, device, cfg.eval_batches, dtype)
        text = generate_text(model, tok, cfg.sample_prompt, cfg.sample_tokens)
        samples.append({"eval": len(samples), "prompt": cfg.sample_prompt, "generation": text})
        return {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))}

    task = Task(
        train_set,
        lm_loss,
        evaluate,
        checkpoint_dir=paths.pretrained,
        meta={"stage": "pretrain", "corpus": cfg.corpus},
        desc="pretrain",
    )
    result = fit(model, plan, task, ctx)
    ctx.logger.log_table("samples", ["eval", "prompt", "generation"], [list(s.values()) for s in samples])
    final = result.final
    speed = {}
    if device.type == "cuda":  # MFU against the GPU's published bf16 peak (metrics/runtime)
        speed = training_mfu(
            model.cfg, cfg.max_length, result.history, result.tokens_per_s, torch.cuda.get_device_name(device)
        )
    return {
        **speed,
        "initial_val_loss": initial_val,
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "val_perplexity": final.get("val_perplexity"),
        "train_perplexity": math.exp(min(final.get("train_loss", 50.0), 50.0)),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "tokens_per_s": result.tokens_per_s,
        "wall_time_s": result.wall_time_s,
        "compiled": result.compiled,
        "n_params": model.num_params(),
        "history": result.history,
        "samples": samples,
        "checkpoint": str(Path(paths.pretrained)),
    }

"""The `pretrain` stage: next-token training of a GPT on the chosen corpus."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, model_config
from .data import TokenWindows
from .generate import generate_text
from .loggers import MetricLogger
from .model import GPT
from .stages import (
    LM_VOCABS, PretrainConfig, corpus_tokenizer, mirror_of, paths_of, read_corpus, stage_config, training_params,
)
from .train import batches_of, fit, lm_loss, mean_loss, resolve_device, set_seed, autocast_dtype


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def run(params: dict, logger: MetricLogger, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    from .tokenizer import get_tokenizer

    paths = paths_of(params)
    cfg, train = stage_config(params, "pretrain", PretrainConfig)
    mcfg = model_config(cfg.model, drop_rate=cfg.drop_rate, vocab_multiple=cfg.vocab_multiple)
    if cfg.max_length > mcfg.context_length:
        raise ConfigError(
            f"params.pretrain.max_length={cfg.max_length} exceeds the context_length "
            f"{mcfg.context_length} of model preset {cfg.model!r}"
        )
    if cfg.lm_vocab not in LM_VOCABS:
        raise ConfigError(f"params.pretrain.lm_vocab: expected one of {list(LM_VOCABS)}, got {cfg.lm_vocab!r}")
    train_ids, val_ids = read_corpus(paths, cfg.corpus, "train"), read_corpus(paths, cfg.corpus, "val")
    train_set = TokenWindows(train_ids, cfg.max_length, cfg.stride)
    val_set = TokenWindows(val_ids, cfg.max_length, cfg.max_length)
    tok = get_tokenizer(mirror_of(params), corpus_tokenizer(paths))  # the one the corpus was encoded with

    set_seed(train.seed)
    model = GPT(mcfg)
    if cfg.lm_vocab == "corpus":  # the tokens of the corpus's train and val parts, no others
        model.set_lm_vocab(np.union1d(train_ids, val_ids).tolist())
    device = resolve_device(train.device)
    dtype = autocast_dtype(train.precision, device)
    val_batches = batches_of(val_set, _collate, train.batch_size)
    initial_val = mean_loss(model.to(device), val_batches, lm_loss, device, train.eval_batches, dtype)
    samples: list[list[Any]] = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        val = mean_loss(m, val_batches, lm_loss, device, train.eval_batches, dtype)
        text = generate_text(model, tok, cfg.sample_prompt, cfg.sample_tokens)
        samples.append([len(samples), cfg.sample_prompt, text])
        return {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0))}

    result = fit(model, train_set, _collate, train, loss_fn=lm_loss, eval_fn=evaluate,
                 checkpoint_dir=paths.pretrained, resume=resume, logger=logger,
                 meta={"stage": "pretrain", "corpus": cfg.corpus, "tokenizer": tok.name,
                       "stage_params": training_params(cfg)},
                 progress=progress, desc="pretrain")
    logger.log_table("samples", ["eval", "prompt", "generation"], samples)
    final = result.final
    return {
        "initial_val_loss": initial_val,
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "val_perplexity": final.get("val_perplexity"),
        "train_perplexity": math.exp(min(final.get("train_loss", 50.0), 50.0)),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "tokens_per_s": result.tokens_per_s,
        "wall_time_s": result.wall_time_s,
        "n_params": model.num_params(),
        "lm_vocab_size": len(model.lm_vocab) if model.lm_vocab is not None else mcfg.vocab_size,
        "history": result.history,
        "samples": [{"eval": i, "prompt": p, "generation": g} for i, p, g in samples],
        "checkpoint": str(Path(paths.pretrained)),
        "tokenizer": tok.name,
    }


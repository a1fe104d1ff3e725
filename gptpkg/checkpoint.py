"""The one checkpoint format: a folder with `model.safetensors` (weights) and
`config.json` (model config, classifier head, extra metadata), plus `trainer.pt`
(optimizer and progress, tensors only) when saved for resuming.

Folders are written under a temp name beside the target and swapped in by rename, so a
crash mid-write never leaves a half-written checkpoint or destroys the previous one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .errors import GptpkgError
from .files import atomic_dir
from .model import GPT
from .presets import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER = "trainer.pt"


class CheckpointError(GptpkgError, RuntimeError):
    pass


def unwrap(model: torch.nn.Module) -> GPT:
    # DDP wraps in .module, torch.compile in ._orig_mod
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model  # type: ignore[return-value]


def write_model(dir_: Path, model: torch.nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write weights and config into an existing folder (use inside `atomic_dir`)."""
    model = unwrap(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.tied:
        del state["out_head.weight"]  # shares storage with tok_emb.weight
    save_file(state, str(dir_ / WEIGHTS))
    config = {
        "model": model.cfg.model_dump(),
        "n_classes": model.n_classes,
        "logit_offset": None if model.logit_offset is None else list(model.logit_offset),
        "tied": model.tied,
        "meta": meta or {},
    }
    (dir_ / CONFIG).write_text(json.dumps(config, indent=2))


def save_checkpoint(
    target: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    with atomic_dir(target) as tmp:
        write_model(tmp, model, meta)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
    return Path(target)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} is not a gptpkg checkpoint: {CONFIG} missing (expected a folder with {WEIGHTS} and {CONFIG})"
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from a checkpoint folder. Returns (model, config dict)."""
    path = Path(path)
    config = read_config(path)
    try:
        mcfg = ModelConfig.parse(config["model"], f"{path / CONFIG}:model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG}: bad model config: {e}") from None
    model = GPT(mcfg)
    if config.get("n_classes"):
        try:
            model.to_classifier(int(config["n_classes"]))
            model.set_logit_offset(config.get("logit_offset"))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path / CONFIG}: {e}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} missing")
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {e}") from None
    if model.tied:
        state["out_head.weight"] = state["tok_emb.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if model.tied:
        model.out_head.weight = model.tok_emb.weight
    return model.to(map_location), config


def check_same_training(checkpoint_dir: str | Path, now: dict[str, Any]) -> None:
    """Before resuming `checkpoint_dir`: the training params it records (meta "params",
    `TrainConfig.training_params`) must equal `now`, else a ConfigError naming the keys
    that differ, so a resumed result is the one params.yaml describes."""
    saved = read_config(checkpoint_dir).get("meta", {}).get("params")
    if saved is None:
        raise ConfigError(f"--resume: {checkpoint_dir} records no training params to compare; run without --resume")
    differ = sorted(k for k in {**saved, **now} if saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"--resume: {checkpoint_dir} was trained with other values for {differ} "
            f"(checkpoint: {[saved.get(k) for k in differ]}, params: {[now.get(k) for k in differ]}); "
            f"restore them or run without --resume"
        )


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / TRAINER
    if not f.is_file():
        return None
    # Never unpickle arbitrary objects: the trainer state holds only tensors and numbers.
    return torch.load(f, map_location="cpu", weights_only=True)

"""The one checkpoint format: a folder with `model.safetensors` (weights) and
`config.json` (model config, classifier head, extra metadata), plus `trainer.pt`
(optimizer and progress, tensors only) when saved for resuming.

Folders are written under a temp name beside the target and swapped in by rename, so a
crash mid-write never leaves a half-written checkpoint or destroys the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .config import POOLINGS, ConfigError, ModelConfig, from_dict
from .model import GPT
from .errors import GptpkgError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER = "trainer.pt"


class CheckpointError(GptpkgError, RuntimeError):
    pass


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces `target` (an old one is removed
    only after the new one is in place); on error it is deleted and `target` is kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_mode() -> int:
    """The mode a plain `open(..., "w")` would give (mkstemp makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unwrap(model: torch.nn.Module) -> GPT:
    # DDP wraps in .module, torch.compile in ._orig_mod
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model  # type: ignore[return-value]


def write_model(dir_: Path, model: torch.nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write weights and config into an existing folder (use inside `atomic_dir`)."""
    model = _unwrap(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.tied:
        del state["out_head.weight"]  # shares storage with tok_emb.weight
    save_file(state, str(dir_ / WEIGHTS))
    config = {
        "model": dataclasses.asdict(model.cfg),
        "n_classes": model.n_classes,
        "pooling": model.pooling,
        "logit_offset": None if model.logit_offset is None else list(model.logit_offset),
        "lm_vocab": None if model.lm_vocab is None else list(model.lm_vocab),
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
            f"{path} is not a gptpkg checkpoint: {CONFIG} missing "
            f"(expected a folder with {WEIGHTS} and {CONFIG})"
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
        mcfg = from_dict(ModelConfig, config["model"], f"{path / CONFIG}:model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG}: bad model config: {e}") from None
    model = GPT(mcfg)
    if config.get("n_classes"):
        try:
            model.to_classifier(int(config["n_classes"]), config.get("pooling", POOLINGS[0]))
            model.set_logit_offset(config.get("logit_offset"))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path / CONFIG}: {e}") from None
    elif config.get("lm_vocab") is not None:
        try:
            model.set_lm_vocab(config["lm_vocab"])
        except ValueError as e:
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


def check_same_training(checkpoint_dir: str | Path, now: dict[str, Any], where: str,
                        stage: dict[str, Any] | None = None) -> None:
    """Before resuming `checkpoint_dir`: its recorded training params (meta "train") must
    equal `now` (`asdict(TrainConfig)`), and its recorded stage keys (meta
    "stage_params", `stages.training_params`) must equal `stage`, else a ConfigError
    naming the keys that differ. A folder without a checkpoint passes (the training
    starts from step 0); a checkpoint written before stage keys were recorded is
    compared on its training params only."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / CONFIG).is_file():
        return
    meta = read_config(checkpoint_dir).get("meta", {})
    saved = meta.get("train")
    if saved is None:
        raise ConfigError(f"--resume: {checkpoint_dir} holds no training state to resume")
    if stage is not None and isinstance(meta.get("stage_params"), dict):
        saved, now = {**meta["stage_params"], **saved}, {**stage, **now}
    differ = sorted(k for k in now if saved.get(k) != now[k])
    if differ:
        raise ConfigError(
            f"--resume: {checkpoint_dir} was trained with other {where} values for {differ} "
            f"(checkpoint: {[saved.get(k) for k in differ]}, params: {[now[k] for k in differ]}); "
            f"restore them or run without --resume")


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / TRAINER
    if not f.is_file():
        return None
    # Never unpickle arbitrary objects: the trainer state holds only tensors and numbers.
    return torch.load(f, map_location="cpu", weights_only=True)

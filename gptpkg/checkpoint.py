"""The one checkpoint format: a folder with `model.safetensors` (weights) and
`config.json` (its `kind`, "lm" or "classifier", the model config, a classifier's
`n_classes` and `logit_offset`, extra metadata), plus `trainer.pt`
(optimizer and progress, tensors only) when saved for resuming.

A model fine-tuned with LoRA (gptpkg.lora) is saved as its adapter: `model.safetensors`
holds only the trained tensors (A, B, a classifier's head) and config.json's `adapter`
names its base (init, path, sha256 of the base's weights file); loading rebuilds the
base from that path, checks the hash and puts the adapter on it.

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
from .model import GPT, GPTClassifier
from .presets import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER = "trainer.pt"
# config.json "kind": what the folder holds
LM, CLASSIFIER = "lm", "classifier"


class CheckpointError(GptpkgError, RuntimeError):
    pass


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP wraps in .module, torch.compile in ._orig_mod
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def write_model(dir_: Path, model: torch.nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write weights and config into an existing folder (use inside `atomic_dir`)."""
    from .lora import adapter_of, adapter_state

    model = unwrap(model)
    adapter = adapter_of(model)
    state = adapter_state(model) if adapter else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config: dict[str, Any] = {"kind": LM, "model": model.cfg.model_dump()}
    if isinstance(model, GPTClassifier):
        config["kind"] = CLASSIFIER
        config["n_classes"] = model.n_classes
        config["logit_offset"] = None if model.logit_offset is None else list(model.logit_offset)
    else:
        if model.tied and not adapter:
            del state["out_head.weight"]  # shares storage with tok_emb.weight
        config["tied"] = model.tied
    if adapter:
        config["adapter"] = adapter
    config["meta"] = meta or {}
    save_file(state, str(dir_ / WEIGHTS))
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


def checkpoint_kind(config: dict[str, Any], where: Path) -> str:
    """What a checkpoint holds, "lm" or "classifier": its config's `kind`; one written
    before configs said so is a classifier when it has `n_classes`."""
    kind = config.get("kind")
    if kind is None:
        return CLASSIFIER if config.get("n_classes") else LM
    if kind not in (LM, CLASSIFIER):
        raise CheckpointError(f"{where}: kind: expected {LM!r} or {CLASSIFIER!r}, got {kind!r}")
    return kind


def _unkinded_classifier_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a classifier checkpoint without `kind`, under today's names: those
    files hold one GPT whose `out_head` (n_classes, C) is the class head."""
    return {
        "head." + k.removeprefix("out_head.") if k.startswith("out_head.") else "backbone." + k: v
        for k, v in state.items()
    }


def _adapter_base(adapter: dict[str, Any], where: Path) -> GPT:
    """The base model an adapter checkpoint names, its weights checked against the hash
    recorded when the adapter was trained."""
    from .raw import sha256_of

    try:
        init, path, want = adapter["base"]["init"], Path(adapter["base"]["path"]), adapter["base"]["sha256"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{where}: adapter.base: expected init, path and sha256 of the base model") from None
    if init == "openai":
        from .hf_weights import load_openai_gpt2, weights_file

        weights, load = weights_file(path), load_openai_gpt2
    else:
        weights, load = path / WEIGHTS, lambda p: load_checkpoint(p)[0]
    if not weights.is_file():
        raise CheckpointError(
            f"{where}: the adapter's base {weights} is missing (expected the model it was trained on)"
        )
    got = sha256_of(weights)
    if got != want:
        raise CheckpointError(
            f"{where}: the adapter's base {weights} has sha256 {got[:12]}, expected {want[:12]} (the weights it "
            f"was trained on): restore them or fine-tune again"
        )
    base = load(path)
    if not isinstance(base, GPT):
        raise CheckpointError(f"{where}: the adapter's base {path} is not a language model")
    return base


def _build(config: dict[str, Any], kind: str, where: Path) -> GPT | GPTClassifier:
    try:
        mcfg = ModelConfig.parse(config["model"], f"{where}:model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{where}: bad model config: {e}") from None
    adapter = config.get("adapter")
    model = GPT(mcfg) if adapter is None else _adapter_base(adapter, where)
    if adapter is not None:
        model.set_drop_rate(mcfg.drop_rate)
    if kind == LM:
        return model
    n = config.get("n_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{where}: n_classes: expected a number of classes >= 1 for a classifier, got {n!r}")
    clf = GPTClassifier(model, n)
    try:
        clf.set_logit_offset(config.get("logit_offset"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return clf


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT | GPTClassifier, dict]:
    """Rebuild the model from a checkpoint folder: a `GPT` (kind "lm") or a
    `GPTClassifier` (kind "classifier"). Returns (model, config dict)."""
    path = Path(path)
    config = read_config(path)
    kind = checkpoint_kind(config, path / CONFIG)
    model = _build(config, kind, path / CONFIG)
    adapter = config.get("adapter")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} missing")
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {e}") from None
    if kind == CLASSIFIER and "kind" not in config:
        state = _unkinded_classifier_state(state)
    tied = isinstance(model, GPT) and model.tied
    if tied and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    if adapter is not None:
        from .lora import adapter_state, apply_lora, resize_to

        try:
            a = adapter
            apply_lora(model, a["rank"], a["alpha"], a["dropout"], a["targets"], a["base"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path / CONFIG}: adapter: {e}") from None
        resize_to(model, state)
        tied = False  # the base's own tie stands; the adapter holds no embedding
    missing, unexpected = model.load_state_dict(state, strict=False)
    if adapter is not None:
        missing = sorted(set(adapter_state(model)) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
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

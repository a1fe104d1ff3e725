"""Configuration: the model preset table, the training hyperparameters, and the one
path from a `params.yaml` section to a frozen dataclass.

Unknown keys and wrong types are errors that name the key, the section and what was
expected, so a typo in `params.yaml` never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from .errors import GptpkgError


class ConfigError(GptpkgError, ValueError):
    """A params file, section or key is missing, unknown or of the wrong type."""


# How a classifier reads one vector out of a text's hidden states: at its last real token
# (causal attention has let it see the whole text), or their mean over the real tokens.
# Both ignore padding, so a text's logits do not depend on what it is batched with.
POOLINGS = ("last_real_token", "mean")


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 architecture. Names follow the book (`emb_dim`, `n_heads`, ...)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_weights: bool = True
    # Pad the embedding/head rows to a multiple of this (64 on GPUs: 50257 -> 50304
    # makes the head matmul tile cleanly). 1 = no padding. Padded logits are sliced off.
    vocab_multiple: int = 1

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise ConfigError(
                f"emb_dim={self.emb_dim} must be divisible by n_heads={self.n_heads}"
            )
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, tie_weights=True)

# The one preset table. OpenAI's four sizes, then small presets that train on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    "cpu-small": dict(_GPT2, context_length=256, emb_dim=256, n_layers=6, n_heads=8),
    "cpu-mini": dict(_GPT2, context_length=256, emb_dim=128, n_layers=4, n_heads=4),
    "tiny": dict(_GPT2, context_length=128, emb_dim=32, n_layers=2, n_heads=2),
}

# Known parameter counts (tied head), checked by the tests.
KNOWN_PARAM_COUNTS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset named `preset`, with `overrides` (e.g. `drop_rate=0.1`) applied."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model key(s) {sorted(unknown)} for preset {preset!r}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of the one training loop (`gptpkg.train.fit`)."""

    lr: float = 4e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the step count computed from `epochs`
    batch_size: int = 8
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 50  # optimizer steps; 0 = only at the end
    eval_batches: int = 0  # 0 = the whole validation set
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    seed: int = 123
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: str = "auto"  # auto (on CUDA) | true | false
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: an untied, trainable token embedding (a classifier's) gets row-sparse
    # gradients and RowSparseAdamW on CPU in one process without compile | false
    sparse_embedding: str = "auto"
    # Layer-wise lr decay d: a GPT's head and final norm train at lr, the top block at
    # lr * d, each block below at d times the one above, the embeddings at
    # lr * d^(n_layers + 1) (`train.layer_lr_scales`); 1 = one lr for every layer.
    lr_layer_decay: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.lr_layer_decay <= 1.0:
            raise ConfigError(f"lr_layer_decay must be in (0, 1] (1 = one lr for every layer), "
                              f"got {self.lr_layer_decay!r}")
        if self.sparse_embedding not in ("auto", "false"):
            raise ConfigError(f"sparse_embedding must be auto|false, got {self.sparse_embedding!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto|fp32|bf16, got {self.precision!r}")
        if str(self.compile) not in ("auto", "true", "false", "True", "False"):
            raise ConfigError(f"compile must be auto|true|false, got {self.compile!r}")
        for name in ("batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "epochs", "grad_clip", "weight_decay", "warmup_steps", "max_steps",
                     "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("set epochs > 0 or max_steps > 0: nothing to train otherwise")


TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


# ---------------------------------------------------------------------------------
# dict -> dataclass, strictly


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `data`; `where` names the section in error messages.

    Unknown keys, missing required keys and wrong types raise ConfigError.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        value = data[name]
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value, f"{where}.{name}")
        elif not _type_ok(value, tp):
            raise ConfigError(
                f"{where}.{name}: expected {getattr(tp, '__name__', tp)}, "
                f"got {value!r} ({type(value).__name__})"
            )
        elif tp is float:
            value = float(value)
        elif typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def split_train(section: Mapping[str, Any], where: str) -> tuple[dict, TrainConfig]:
    """Split a stage section into its own keys and a TrainConfig of the training keys."""
    own = {k: v for k, v in section.items() if k not in TRAIN_KEYS}
    train = from_dict(TrainConfig, {k: v for k, v in section.items() if k in TRAIN_KEYS}, where)
    return own, train


# ---------------------------------------------------------------------------------
# params.yaml


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` (value parsed as YAML) -> (["section", "key"], value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(params: Mapping[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    out = dict(params)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section of params")
            node[part] = dict(node[part])
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(f"override {text!r}: no key {'.'.join(path)!r} in params")
        node[path[-1]] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def profile_path(params_path: str | Path, profile: str) -> Path:
    return Path(params_path).parent / "profiles" / f"{profile}.yaml"


def load_params(
    path: str | Path = "params.yaml",
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Read `params.yaml`, merge `profiles/<profile>.yaml` over it (a profile may only
    change keys that exist), then apply `section.key=value` overrides."""
    path = Path(path)
    params = read_yaml(path)
    if profile:
        prof_file = profile_path(path, profile)
        if not prof_file.is_file():
            known = sorted(p.stem for p in prof_file.parent.glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r}: {prof_file} not found; profiles: {known}")
        params = merge_profile(params, read_yaml(prof_file), str(prof_file))
    return apply_overrides(params, overrides)


def merge_profile(base: Mapping[str, Any], over: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`deep_merge`, but a key absent from `base` is an error (catches typos)."""
    for sec, keys in over.items():
        if sec not in base:
            raise ConfigError(f"{where}: section {sec!r} is not in params.yaml")
        if isinstance(keys, Mapping):
            unknown = sorted(set(keys) - set(base[sec] or {}))
            if unknown:
                raise ConfigError(f"{where}: key(s) {unknown} are not in params.yaml section {sec!r}")
    return deep_merge(base, over)


def section(params: Mapping[str, Any], name: str, source: str = "params.yaml") -> dict[str, Any]:
    if name not in params:
        raise ConfigError(f"{source}: missing section {name!r}; sections present: {sorted(params)}")
    return dict(params[name] or {})


def asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "PRESETS",
    "KNOWN_PARAM_COUNTS",
    "TrainConfig",
    "TRAIN_KEYS",
    "model_config",
    "from_dict",
    "split_train",
    "load_params",
    "apply_overrides",
    "deep_merge",
    "section",
    "asdict",
]

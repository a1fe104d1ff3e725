"""Configuration: the model preset table and the one typed tree of `params.yaml`.

`load_params` reads `params.yaml`, merges a profile and `--set` overrides over it, and
parses the result once into `Params`: one frozen dataclass per section. Unknown keys,
wrong types and broken rules are errors that name the key and what was expected, so a
typo never silently falls back to a default. Each rule lives in the `__post_init__` of
the section that owns the key. Torch-free: `fetch` and `prepare` import it too.
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .errors import GptpkgError


class ConfigError(GptpkgError, ValueError):
    """A params file, section or key is missing, unknown, of the wrong type or out of range."""


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ConfigError naming `key`, what was `expected` and the `value` found, unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


# ---------------------------------------------------------------------------------
# The model


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
        require(self.emb_dim % self.n_heads == 0, "emb_dim", f"a multiple of n_heads={self.n_heads}", self.emb_dim)
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(0.0 <= self.drop_rate < 1.0, "drop_rate", "a probability in [0, 1)", self.drop_rate)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m


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
    require(preset in PRESETS, "model preset", f"one of {sorted(PRESETS)}", preset)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    require(not unknown, f"model keys for preset {preset!r}", "ModelConfig fields", sorted(unknown))
    return ModelConfig(**{**PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------
# Sections of params.yaml

Batching = Literal["bucketed", "shuffled", "pad_longest"]


@dataclass(frozen=True)
class Paths:
    """Every file and folder the pipeline reads or writes, declared once."""

    raw: str
    processed: str
    pretrained: str
    spam_classifier: str
    instruct_model: str
    metrics: str
    plots: str
    onnx: str
    bento_model: str  # the record of the packaged model's BentoML store entry
    wandb: str


@dataclass(frozen=True)
class DataConfig:
    mirror: str  # offline mirror folder, tried before the canonical URLs
    files: list[str]
    timeout_s: float
    retries: int

    def __post_init__(self) -> None:
        from .raw import SOURCES

        unknown = [f for f in self.files if f not in SOURCES]
        require(not unknown, "files", f"names from {sorted(SOURCES)}", unknown)
        require(self.timeout_s > 0, "timeout_s", "seconds > 0", self.timeout_s)
        require(self.retries >= 0, "retries", "an integer >= 0", self.retries)


@dataclass(frozen=True)
class PrepareConfig:
    seed: int  # seed of the spam split
    pretrain_train_ratio: float
    spam_split: Literal["book", "full"]
    instruct_seed: int

    def __post_init__(self) -> None:
        require(
            0.0 < self.pretrain_train_ratio < 1.0,
            "pretrain_train_ratio",
            "a share in (0, 1)",
            self.pretrain_train_ratio,
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of the one training loop (`gptpkg.train.fit`); every training
    section of params.yaml holds them beside its own keys."""

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
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    compile: bool | Literal["auto"] = "auto"  # auto: on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # Row-sparse gradients and RowSparseAdamW for an untied trainable token embedding (a
    # classifier's), where they pay: on CPU, in one process, without compile.
    sparse_embedding: bool = True

    # Own keys that act only after or beside training: `--resume` ignores them.
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in (
            "lr",
            "epochs",
            "grad_clip",
            "weight_decay",
            "warmup_steps",
            "max_steps",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        ):
            require(getattr(self, name) >= 0, name, "a number >= 0", getattr(self, name))
        require(
            self.epochs > 0 or self.max_steps > 0,
            "epochs",
            "> 0, or max_steps > 0 (nothing to train otherwise)",
            self.epochs,
        )
        require(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "device",
            "auto|cpu|cuda|cuda:N|mps",
            self.device,
        )

    def training_params(self) -> dict[str, Any]:
        """The keys that shape the trained weights: a checkpoint records them, and
        `--resume` continues only a checkpoint trained with the same values."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.AFTER_TRAINING}


def _check_start(cfg) -> None:
    """The rules of a fine-tuning's start model (`init`, `openai_weights`, `drop_rate`)."""
    require(
        cfg.init != "openai" or bool(cfg.openai_weights),
        "openai_weights",
        "a local folder of GPT-2 weights with init: openai",
        cfg.openai_weights,
    )
    require(
        cfg.drop_rate is None or 0.0 <= cfg.drop_rate < 1.0,
        "drop_rate",
        "null (the start model's) or a probability in [0, 1)",
        cfg.drop_rate,
    )


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainConfig):
    model: str  # a preset of PRESETS
    drop_rate: float
    vocab_multiple: int  # pad the vocabulary to a multiple of this (64 on GPUs; 1 = none)
    corpus: list[Literal["the-verdict.txt", "tinyshakespeare.txt", "sms", "instructions"]]
    max_length: int
    stride: int
    sample_prompt: str
    sample_tokens: int
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"sample_prompt", "sample_tokens"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.model in PRESETS, "model", f"a preset of {sorted(PRESETS)}", self.model)
        require(bool(self.corpus), "corpus", "a non-empty list of sources", self.corpus)
        context = self.model_config().context_length
        require(
            1 <= self.max_length <= context,
            "max_length",
            f"1..{context} (the context_length of {self.model})",
            self.max_length,
        )
        require(self.stride >= 1, "stride", "an integer >= 1", self.stride)

    def model_config(self) -> ModelConfig:
        return model_config(self.model, drop_rate=self.drop_rate, vocab_multiple=self.vocab_multiple)


@dataclass(frozen=True, kw_only=True)
class SpamConfig(TrainConfig):
    init: Literal["pretrained", "openai", "scratch"]
    openai_weights: str  # local folder of OpenAI's GPT-2 weights (init: openai)
    model: str  # preset, used only with init: scratch
    trainable: Literal["head", "last_blocks", "all"]
    n_blocks: int
    max_length: int
    class_weights: list[float] | None  # ham, spam
    batching: Batching
    drop_rate: float | None  # dropout while fine-tuning; None = the start model's
    train_data: Literal["book", "all"]
    cv_folds: int  # k >= 2: also k-fold cross-validate on the training messages; 0 = off
    soup: int  # n: average n fine-tunings (seeds seed .. seed + n - 1) into one classifier
    decision_spam_share: float | None  # decide for this spam share; None = as trained
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"openai_weights", "cv_folds", "decision_spam_share"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_start(self)
        require(self.init != "scratch" or self.model in PRESETS, "model", f"a preset of {sorted(PRESETS)}", self.model)
        require(self.max_length >= 1, "max_length", "an integer >= 1", self.max_length)
        require(self.n_blocks >= 1, "n_blocks", "an integer >= 1", self.n_blocks)
        require(
            self.class_weights is None or (len(self.class_weights) == 2 and min(self.class_weights) > 0),
            "class_weights",
            "null or two positive weights [ham, spam]",
            self.class_weights,
        )
        require(
            self.cv_folds == 0 or self.cv_folds >= 2, "cv_folds", "0 (off) or a number of folds >= 2", self.cv_folds
        )
        require(self.soup >= 1, "soup", "an integer >= 1 (the number of fine-tunings averaged)", self.soup)
        share = self.decision_spam_share
        require(
            share is None or 0.0 < share < 1.0,
            "decision_spam_share",
            "null (decide as trained) or a spam share strictly between 0 and 1",
            share,
        )


@dataclass(frozen=True)
class BaselineConfig:
    max_features: int  # 0 = all terms
    ngram_max: int
    C: float
    train_data: Literal["book", "all"]  # as finetune_spam.train_data

    def __post_init__(self) -> None:
        require(self.max_features >= 0, "max_features", "an integer >= 0 (0 = all terms)", self.max_features)
        require(self.ngram_max >= 1, "ngram_max", "an integer >= 1", self.ngram_max)
        require(self.C > 0, "C", "a number > 0", self.C)


@dataclass(frozen=True)
class BaselineInstructConfig:
    """The retrieval baseline: answer with the training output of the nearest training
    instruction (TF-IDF over instruction + input, cosine)."""

    max_features: int  # 0 = all terms
    ngram_max: int

    def __post_init__(self) -> None:
        require(self.max_features >= 0, "max_features", "an integer >= 0 (0 = all terms)", self.max_features)
        require(self.ngram_max >= 1, "ngram_max", "an integer >= 1", self.ngram_max)


@dataclass(frozen=True, kw_only=True)
class InstructConfig(TrainConfig):
    init: Literal["pretrained", "openai"]
    openai_weights: str
    max_length: int
    mask_prompt: bool
    max_new_tokens: int
    repetition_penalty: float  # decoding: > 1 discourages tokens already generated; 1 = off
    no_repeat_ngram: int  # decoding: forbid repeating a generated n-gram; 0 = off
    judge_url: str
    judge_model: str
    batching: Batching
    drop_rate: float | None  # dropout while fine-tuning; None = the start model's
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset(
        {"openai_weights", "max_new_tokens", "repetition_penalty", "no_repeat_ngram", "judge_url", "judge_model"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_start(self)
        require(self.max_length >= 2, "max_length", "an integer >= 2", self.max_length)
        require(self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0", self.max_new_tokens)
        require(self.repetition_penalty > 0, "repetition_penalty", "a number > 0 (1 = off)", self.repetition_penalty)
        require(self.no_repeat_ngram >= 0, "no_repeat_ngram", "an integer >= 0 (0 = off)", self.no_repeat_ngram)


@dataclass(frozen=True)
class ExportConfig:
    opset: int  # ONNX opset of the exported graph
    parity_atol: float  # max |logit_onnx - logit_torch| allowed on the test split
    batch_size: int  # rows per run for the parity check and the accuracy figures
    int8: bool  # also write a dynamic-quantized int8 copy (kept only if it passes the gate)
    int8_max_drop: float  # accuracy points (0-100) int8 may lose against fp32 on the test split
    min_test_accuracy: float  # a classifier below this test accuracy is not exported (the quality gate)

    def __post_init__(self) -> None:
        require(self.opset >= 17, "opset", "an ONNX opset >= 17", self.opset)
        require(
            0.0 <= self.min_test_accuracy <= 1.0, "min_test_accuracy", "a fraction in [0, 1]", self.min_test_accuracy
        )
        require(self.parity_atol > 0, "parity_atol", "a tolerance > 0", self.parity_atol)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.int8_max_drop >= 0, "int8_max_drop", "accuracy points >= 0", self.int8_max_drop)


@dataclass(frozen=True)
class PackageConfig:
    model_name: str  # BentoML model name; the version is derived from the ONNX file
    variant: Literal["fp32", "int8"]  # which ONNX file the service runs


@dataclass(frozen=True)
class WandbConfig:
    project: str
    entity: str
    mode: Literal["offline", "online", "disabled"]


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, parsed. A stage reads only its own section."""

    paths: Paths
    data: DataConfig
    prepare: PrepareConfig
    pretrain: PretrainConfig
    finetune_spam: SpamConfig
    baseline_spam: BaselineConfig
    finetune_instruct: InstructConfig
    baseline_instruct: BaselineInstructConfig
    export_onnx: ExportConfig
    package: PackageConfig
    wandb: WandbConfig


# ---------------------------------------------------------------------------------
# dict -> dataclass, strictly


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    names = {type(None): "null", bool: "true|false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp) or getattr(tp, "__name__", str(tp))


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:  # by type too: True is not 1
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _coerce(value: Any, tp: Any) -> Any:
    """int -> float where a float is expected (YAML writes 1 for 1.0); lists stay lists."""
    if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is float:
        return [float(v) for v in value]
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from `data`; `where` names the section in error messages.

    Unknown keys, missing required keys, wrong types and broken rules raise ConfigError.
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
        value, tp = data[name], hints[name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value, f"{where}.{name}")
        elif not _type_ok(value, tp):
            raise ConfigError(f"{where}.{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[name] = _coerce(value, tp)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


# ---------------------------------------------------------------------------------
# params.yaml, profiles, overrides


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _set_key(params: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """params[section][key] = value, where the key must already exist (catches typos)."""
    sec, _, key = dotted.partition(".")
    if not isinstance(params.get(sec), dict) or key not in params[sec]:
        raise ConfigError(f"{where}: no key {dotted!r} in params.yaml (expected section.key)")
    params[sec] = {**params[sec], key: value}


def merged_params(
    path: str | Path = "params.yaml", overrides: Sequence[str] = (), profile: str | None = None
) -> dict[str, Any]:
    """params.yaml as a dict, with `profiles/<profile>.yaml` merged over it and then the
    `section.key=value` overrides (values parsed as YAML); only existing keys may change."""
    path = Path(path)
    params = read_yaml(path)
    if profile:
        prof_file = path.parent / "profiles" / f"{profile}.yaml"
        if not prof_file.is_file():
            known = sorted(p.stem for p in prof_file.parent.glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r}: {prof_file} not found; profiles: {known}")
        for sec, keys in read_yaml(prof_file).items():
            if not isinstance(keys, Mapping):
                raise ConfigError(f"{prof_file}: section {sec!r} must be a mapping of keys")
            for key, value in keys.items():
                _set_key(params, f"{sec}.{key}", value, str(prof_file))
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r}: expected section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from None
        _set_key(params, key.strip(), value, f"override {text!r}")
    return params


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = (), profile: str | None = None) -> Params:
    """The entry point's one call: params.yaml + profile + overrides, parsed into `Params`."""
    return from_dict(Params, merged_params(path, overrides or (), profile), "params")


def apply_profile(params_file: str | Path, profile: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """Write the keys a profile and overrides change into `params_file` in place (comments
    and key order kept), so `dvc repro` and `dvc exp run` run with them and dvc.lock
    records them. Returns the changed keys ("section.key"). Nothing is written when
    nothing changes or the result would not parse."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    from .files import atomic_write_text

    params_file = Path(params_file)
    merged = merged_params(params_file, overrides, profile)
    from_dict(Params, merged, "params")  # validate before writing anything
    base = read_yaml(params_file)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    # So every YAML 1.1 reader (PyYAML) reads the same values back: 5e-05 would be a
    # string there (it needs "5.0e-05"), and null stays spelled out.
    rt.representer.add_representer(
        float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", yaml.safe_dump(v).split("\n")[0])
    )
    rt.representer.add_representer(type(None), lambda r, v: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_file.read_text(encoding="utf-8"))
    changed = []
    for sec, keys in merged.items():
        for key, value in keys.items():
            if base[sec].get(key) == value and type(base[sec].get(key)) is type(value):
                continue  # keep its spelling
            changed.append(f"{sec}.{key}")
            if isinstance(value, list):
                value = CommentedSeq(value)
                value.fa.set_flow_style()
            doc[sec][key] = value
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        atomic_write_text(params_file, buf.getvalue())
    return changed

"""Configuration: the one typed tree of `params.yaml`.

`load_params` reads `params.yaml`, merges a profile and `--set` overrides over it
(`gptpkg.profiles`), and validates the result once into `Params`: one frozen pydantic
model per section. Each key declares its type, its constraints and a description (the
CLI's help and docs/params.md show them); a rule that spans keys is a validator of the
section that owns them. Unknown keys, wrong types and broken rules are `ConfigError`s
that name the key, what was expected and the value found, so a typo never silently falls
back to a default. Torch-free: `fetch` and `prepare` import it too.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .errors import GptpkgError

if TYPE_CHECKING:
    from typing_extensions import Self

    from .presets import ModelConfig


class ConfigError(GptpkgError, ValueError):
    """A params file, section or key is missing, unknown, of the wrong type or out of range."""


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """In a validator: fail naming `key`, what was `expected` and the `value` found, unless `ok`."""
    if not ok:
        raise PydanticCustomError(
            "rule", "{key}: expected {expected}, got {got}", dict(key=key, expected=expected, got=repr(value))
        )


def key(description: str, default: Any = ..., expected: str | None = None, **constraints: Any) -> Any:
    """A section key: its `description`, pydantic `constraints` (ge=1, ...) and, where the
    generic wording ("an integer >= 1") says too little, the `expected` text of its errors."""
    extra = {"expected": expected} if expected else None
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    """A frozen, strictly typed part of the params tree: True is not an integer, "1" is not
    a number, but an integer is a number (YAML writes 1 for 1.0) and becomes a float.
    `parse` validates data from outside (files, overrides) and raises ConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, protected_namespaces=())

    @classmethod
    def parse(cls, data: Any, where: str) -> Self:
        """Validate `data` (a mapping of keys) into `cls`; `where` names it in error messages."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(error_text(e, cls, data, where)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, every rule checked again."""
        return self.parse({**self.model_dump(), **changes}, type(self).__name__)


# ---------------------------------------------------------------------------------
# What a key expects, in words: error messages, the CLI's help and docs/params.md


_NAMES = {type(None): "null", bool: "true|false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def type_name(tp: Any) -> str:
    """A type annotation in words: "an integer", "auto|fp32|bf16", "a number or null"."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "|".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        item = typing.get_args(item)[0] if typing.get_origin(item) is Annotated else item
        return "a list of " + _PLURALS.get(item, type_name(item))
    return _NAMES.get(tp) or getattr(tp, "__name__", str(tp))


def expected_text(field: FieldInfo) -> str:
    """What `field` accepts: its `expected` text, else its type and bounds ("a number >= 0")."""
    if isinstance(field.json_schema_extra, dict) and "expected" in field.json_schema_extra:
        return str(field.json_schema_extra["expected"])
    bounds = {b: getattr(m, b) for m in field.metadata for b in _BOUNDS if hasattr(m, b)}
    name = type_name(field.annotation)
    if len(bounds) == 2:
        low = "[" if "ge" in bounds else "("
        high = "]" if "le" in bounds else ")"
        lo, hi = sorted(bounds.values())
        return f"{name} in {low}{lo:g}, {hi:g}{high}"
    return " ".join([name, *(f"{_BOUNDS[b]} {v:g}" for b, v in bounds.items())])


_VALUE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_short",
    "too_long",
    "string_pattern_mismatch",
}


def _walk(cls: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], list[str], tuple]:
    """(the section model at `loc`, its path from `cls`, the rest of `loc`)."""
    path: list[str] = []
    for i, part in enumerate(loc):
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        tp = field.annotation if field else None
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            return cls, path, loc[i:]
        cls, path = tp, [*path, part]
    return cls, path, ()


def _lookup(data: Any, path: Sequence[str]) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def error_text(err: ValidationError, cls: type[BaseModel], data: Any, where: str) -> str:
    """One clause per problem in `err`, on one line: the key with its section path from
    `where`, what was expected, and the value found (`data` is what was validated)."""
    unknown: dict[str, tuple[type[BaseModel], list[str]]] = {}
    missing: dict[str, list[str]] = {}
    problems: dict[Any, set[str]] = {}  # a finished clause, or a field's (at, section, path, name): its error kinds
    for e in err.errors(include_url=False):
        loc, kind = tuple(e["loc"]), e["type"]
        section, path, rest = _walk(cls, loc[:-1] if kind in ("extra_forbidden", "missing") else loc)
        at = ".".join([where, *path])
        if kind == "extra_forbidden":
            unknown.setdefault(at, (section, []))[1].append(str(loc[-1]))
        elif kind == "missing":
            missing.setdefault(at, []).append(str(loc[-1]))
        elif kind in ("model_type", "dict_type") and not rest:
            problems.setdefault(f"{at}: expected a mapping of keys, got {type(e['input']).__name__}", set())
        elif kind == "rule":  # from `require`: "key: expected ..., got ..."
            problems.setdefault(f"{at}.{e['msg']}", set())
        elif rest and rest[0] in section.model_fields:
            problems.setdefault((at, section, tuple(path), rest[0]), set()).add(kind)
        else:
            problems.setdefault(f"{at}: {e['msg']}", set())
    clauses = [
        f"{at}: unknown key(s) {sorted(names)}; expected keys: {sorted(section.model_fields)}"
        for at, (section, names) in unknown.items()
    ]
    clauses += [
        f"{at}: missing required key {names[0]!r}" if len(names) == 1 else f"{at}: missing required keys {names}"
        for at, names in missing.items()
    ]
    for problem, kinds in problems.items():
        if isinstance(problem, tuple):
            at, section, path, name = problem
            field, value = section.model_fields[name], _lookup(data, [*path, name])
            if kinds & _VALUE_ERRORS:  # the type is right, the value is not
                problem = f"{at}.{name}: expected {expected_text(field)}, got {value!r}"
            else:
                problem = f"{at}.{name}: expected {type_name(field.annotation)}, got {value!r} ({type(value).__name__})"
        clauses.append(problem)
    return "; ".join(clauses)


# ---------------------------------------------------------------------------------
# Sections of params.yaml

Batching = Literal["bucketed", "shuffled", "pad_longest"]
_BATCHING = (
    "bucketed (similar lengths per batch), shuffled (random batches, each padded to its longest) "
    "or pad_longest (every example padded to the longest of the training set, the book's)"
)
_START_DROP_RATE = "null (the start model's) or a probability in [0, 1)"
_TERMS = "TF-IDF vocabulary size: the most frequent terms kept; 0 = all terms"
_NGRAMS = "longest word n-gram among the TF-IDF terms"


class Paths(Section):
    """Every file and folder the pipeline reads or writes, declared once."""

    raw: str = key("the fetched raw files, sha256-verified")
    corpus: str = key(
        "your own text for pretraining (the source `corpus`): .txt/.md files (one document each), .jsonl "
        "(a text field per line), .parquet (a text column), optionally .gz/.zst; `dvc add` it"
    )
    token_cache: str = key(
        "tokens of every file prepare has tokenized, by content hash (outside DVC's outputs; safe to delete)"
    )
    processed: str = key("prepare's outputs: the token shards with their manifest, the spam and instruction splits")
    pretrained: str = key("the pretrained language model's checkpoint")
    openai_weights: str = key(
        "OpenAI's GPT-2 weights that `weights` obtains (config.json + model.safetensors), read by init: openai"
    )
    spam_classifier: str = key("the fine-tuned spam classifier's checkpoint")
    instruct_model: str = key("the instruction-fine-tuned model's checkpoint")
    metrics: str = key("each stage's metrics JSON; run-dependent figures under runtime/")
    plots: str = key("each stage's plot data and images")
    onnx: str = key("the exported ONNX classifier, and its int8 copy when kept")
    bento_model: str = key("the record of the BentoML model store entry that `package` made")
    wandb: str = key("the W&B run folders (offline runs: `wandb sync` uploads them)")


class DataConfig(Section):
    """What `fetch` fetches: every raw file has a canonical URL and a pinned sha256."""

    mirror: str = key(
        "offline mirror folder, tried before the canonical URLs (missing = download); $GPTPKG_DATA_MIRROR wins"
    )
    files: list[str] = key("the raw files to fetch, by name")
    timeout_s: float = key("seconds a download waits for the server", expected="seconds > 0", gt=0)
    retries: int = key("download attempts after a failed one", ge=0)

    @field_validator("files")
    @classmethod
    def _known_files(cls, files: list[str]) -> list[str]:
        from .raw import SOURCES

        unknown = [f for f in files if f not in SOURCES]
        require(not unknown, "files", f"names from {sorted(SOURCES)}", unknown)
        return files


class PrepareConfig(Section):
    """How `prepare` splits the data; every split has a fixed seed."""

    seed: int = key("seed of the spam split")
    pretrain_train_ratio: float = key(
        "share of each pretraining source that trains: of a single text its first characters (the book's cut), "
        "of a source of many documents whole documents (chosen by a hash of their text); the rest validates",
        expected="a share in (0, 1)",
        gt=0,
        lt=1,
    )
    spam_split: Literal["book", "full"] = key(
        "book: balanced train and validation splits and a test split of 50% spam, as in the book; "
        "full: every message, stratified"
    )
    instruct_seed: int = key("seed of the instruction split")
    workers: int = key(
        "processes that tokenize the pretraining sources; 0 = one per core", expected="0 (every core) or >= 1", ge=0
    )
    shard_tokens: int = key(
        "tokens per token shard file (uint16: 2 bytes a token)",
        expected="an integer in [1024, 2**31)",
        ge=1024,
        lt=2**31,
    )
    hf_dataset: str = key(
        "a Hugging Face dataset streamed with `datasets` as the source `hf` (a Hub id, or json/parquet/csv/text "
        "with hf_data_files); empty = none. Needs gptpkg[hf-datasets]"
    )
    hf_config: str = key("the dataset's configuration (subset); empty = its default")
    hf_split: str = key("the split of the dataset that is streamed", expected="a split name", min_length=1)
    hf_revision: str = key(
        "the Hub revision (a commit sha makes `dvc repro` reproducible); empty = the main branch at run time"
    )
    hf_data_files: str = key("a path or glob of data files (local, or inside the Hub repository); empty = its own")
    hf_text_field: str = key("the field (column) that holds each document's text", min_length=1)
    hf_max_documents: int = key("stream only the first this many documents; 0 = the whole split", ge=0)


class TrainConfig(Section):
    """Hyperparameters of the one training loop (`gptpkg.train.fit`); every training
    section of params.yaml holds them beside its own keys."""

    lr: float = key("peak learning rate of AdamW, reached after warmup_steps", 4e-4, ge=0)
    min_lr_ratio: float = key("the cosine decay ends at lr * min_lr_ratio", 0.1)
    weight_decay: float = key("AdamW's decoupled weight decay", 0.1, ge=0)
    beta1: float = key("AdamW's decay rate of the gradient's running mean", 0.9)
    beta2: float = key("AdamW's decay rate of the squared gradient's running mean", 0.95)
    warmup_steps: int = key("optimizer steps of linear warmup from 0 to lr", 0, ge=0)
    epochs: float = key("passes over the training data; a fraction is allowed", 1.0, ge=0)
    max_steps: int = key("caps the optimizer steps that epochs give; 0 = no cap", 0, ge=0)
    batch_size: int = key("examples per micro-step; under torchrun the global batch, split over the ranks", 8, ge=1)
    grad_accum_steps: int = key("micro-steps whose gradients add up to one optimizer step", 1, ge=1)
    grad_clip: float = key("largest gradient norm; 0 = no clipping", 1.0, ge=0)
    eval_every: int = key("optimizer steps between evaluations; 0 = at the end only", 50, ge=0)
    eval_batches: int = key("validation batches per evaluation; 0 = the whole validation split", 0, ge=0)
    checkpoint_every: int = key("optimizer steps between resumable checkpoints; 0 = at the end only", 0, ge=0)
    seed: int = key("seed of the initialization, the dropout and the batch order", 123)
    precision: Literal["auto", "fp32", "bf16"] = key("auto: bf16 autocast on CUDA, fp32 elsewhere", "auto")
    compile: bool | Literal["auto"] = key("torch.compile the model; auto: on CUDA", "auto")
    device: str = key(
        "where to train; auto: CUDA when present, else the CPU",
        "auto",
        expected="auto|cpu|cuda|cuda:N|mps",
        pattern=r"^(auto|(cpu|cuda|mps)(:\d+)?)$",
    )
    sparse_embedding: bool = key(
        "row-sparse gradients and RowSparseAdamW for an untied trainable token embedding (a classifier's), "
        "where they pay: on CPU, in one process, without compile; the same weights as dense AdamW (false)",
        True,
    )

    # Own keys that act only after or beside training: `--resume` ignores them.
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _something_to_train(self):
        require(
            self.epochs > 0 or self.max_steps > 0,
            "epochs",
            "> 0, or max_steps > 0 (nothing to train otherwise)",
            self.epochs,
        )
        return self

    def training_params(self) -> dict[str, Any]:
        """The keys that shape the trained weights: a checkpoint records them, and
        `--resume` continues only a checkpoint trained with the same values."""
        return {k: v for k, v in self.model_dump().items() if k not in self.AFTER_TRAINING}


def _preset(name: str) -> str:
    from .presets import PRESETS

    require(name in PRESETS, "model", f"a preset of {sorted(PRESETS)}", name)
    return name


class PretrainConfig(TrainConfig):
    """Pretraining: next-token loss on the chosen corpus."""

    model: str = key("the model preset; `gptpkg presets` lists them")
    drop_rate: float = key(
        "dropout while pretraining, kept by the classifier's fine-tuning when its drop_rate is null",
        expected="a probability in [0, 1)",
        ge=0,
        lt=1,
    )
    vocab_multiple: int = key(
        "pad the vocabulary to a multiple of this: 64 on GPUs (50257 -> 50304 tiles the head matmul); 1 = none", ge=1
    )
    corpus: list[Literal["the-verdict.txt", "tinyshakespeare.txt", "sms", "instructions", "corpus", "hf"]] = key(
        "the sources: the-verdict.txt, tinyshakespeare.txt, sms (every SMS message holding no spam test text), "
        "instructions (the instruction training split), corpus (your own text: the paths.corpus folder), "
        "hf (the Hugging Face dataset prepare.hf_dataset)",
        expected="a non-empty list of sources",
        min_length=1,
    )
    max_length: int = key("tokens per training window, at most the preset's context_length")
    stride: int = key("tokens from the start of one training window to the next", ge=1)
    sample_prompt: str = key("prompt of the text sample generated at every evaluation")
    sample_tokens: int = key("tokens generated from sample_prompt at every evaluation")
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"sample_prompt", "sample_tokens"})

    _known_preset = field_validator("model")(_preset)

    @model_validator(mode="after")
    def _window_fits(self):
        context = self.architecture().context_length
        require(
            1 <= self.max_length <= context,
            "max_length",
            f"1..{context} (the context_length of {self.model})",
            self.max_length,
        )
        return self

    def architecture(self) -> ModelConfig:
        """The model this section pretrains: its preset with drop_rate and vocab_multiple."""
        from .presets import model_config

        return model_config(self.model, drop_rate=self.drop_rate, vocab_multiple=self.vocab_multiple)


class WeightsConfig(Section):
    """OpenAI's GPT-2 weights for the fine-tunings that say init: openai, obtained through
    huggingface_hub (its cache, $HF_ENDPOINT, $HF_TOKEN and $HF_HUB_OFFLINE) or copied
    from a local folder, verified, into paths.openai_weights."""

    model: Literal["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] = key(
        "the size: the Hub repository openai-community/<model> (124M, 355M, 774M, 1558M parameters)"
    )
    revision: str = key("branch, tag or commit of the Hub repository", min_length=1)
    local_folder: str = key(
        "a folder holding config.json + model.safetensors to copy instead of the Hub; empty = the Hub"
    )


_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # gptpkg.lora.TARGETS


class _FineTune(TrainConfig):
    """The LoRA keys both fine-tunings share, read with trainable: lora (gptpkg.lora)."""

    lora_rank: int = key("trainable: lora: the adapters' rank r", 16, ge=1)
    lora_alpha: float = key("trainable: lora: the update is scaled by lora_alpha / lora_rank", 16.0, gt=0)
    lora_dropout: float = key(
        "trainable: lora: dropout on the adapters' input", 0.0, expected="a probability in [0, 1)", ge=0, lt=1
    )
    lora_targets: list[Literal[_LORA_TARGETS]] = key(  # type: ignore[valid-type]
        "trainable: lora: the linear layers of every block that get adapters",
        list(_LORA_TARGETS),
        expected="a non-empty list of attn.qkv, attn.proj, mlp.fc, mlp.proj",
        min_length=1,
    )


class SpamConfig(_FineTune):
    """The spam classifier: the pretrained GPT with a two-class head, fine-tuned."""

    init: Literal["pretrained", "openai", "scratch"] = key(
        "the start model: pretrained (our checkpoint), openai (OpenAI's GPT-2, from the weights stage) "
        "or scratch (the model preset)"
    )
    model: str = key("preset of the fresh model that init: scratch starts from")
    trainable: Literal["head", "last_blocks", "all", "lora"] = key(
        "what trains: head, last_blocks (the last n_blocks, the final norm and the head), all, or lora "
        "(adapters on lora_targets, and the head; the checkpoint holds only those and names its base)"
    )
    n_blocks: int = key("transformer blocks that train with trainable: last_blocks", ge=1)
    max_length: int = key("a message's first max_length tokens are classified", ge=1)
    class_weights: list[Annotated[float, Field(gt=0)]] | None = key(
        "loss weights [ham, spam]: weigh up the rarer spam; null = equal weights",
        expected="null or two positive weights [ham, spam]",
        min_length=2,
        max_length=2,
    )
    batching: Batching = key(_BATCHING)
    drop_rate: float | None = key(
        "dropout while fine-tuning; null = the start model's (pretrain.drop_rate for our checkpoint, 0 for OpenAI's)",
        expected=_START_DROP_RATE,
        ge=0,
        lt=1,
    )
    train_data: Literal["book", "all"] = key(
        "book (the balanced training split) or all (every message holding no validation or test text)"
    )
    cv_folds: int = key(
        "k >= 2: also k-fold cross-validate on the training messages (the cv_* metrics); 0 = off",
        expected="0 (off) or a number of folds >= 2",
    )
    soup: int = key(
        "average n fine-tunings (seeds seed .. seed + n - 1) into one classifier; 1 = one fine-tuning",
        expected="an integer >= 1 (the number of fine-tunings averaged)",
        ge=1,
    )
    decision_spam_share: float | None = key(
        "decide for this share of spam (a spam-logit offset, by Bayes' rule); 0.5 = a balanced mix; null = as trained",
        expected="null (decide as trained) or a spam share strictly between 0 and 1",
        gt=0,
        lt=1,
    )
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"cv_folds", "decision_spam_share"})

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, k: int) -> int:
        require(k == 0 or k >= 2, "cv_folds", "0 (off) or a number of folds >= 2", k)
        return k

    @model_validator(mode="after")
    def _scratch_preset(self):
        if self.init == "scratch":
            _preset(self.model)
            require(self.trainable != "lora", "trainable", "head, last_blocks or all with init: scratch", "lora")
        return self


class BaselineConfig(Section):
    """The spam baseline: TF-IDF and logistic regression on the same split."""

    max_features: int = key(_TERMS, expected="an integer >= 0 (0 = all terms)", ge=0)
    ngram_max: int = key(_NGRAMS, ge=1)
    C: float = key("inverse strength of the logistic regression's L2 regularization", gt=0)
    train_data: Literal["book", "all"] = key("book or all, as finetune_spam.train_data")


class BaselineInstructConfig(Section):
    """The retrieval baseline: answer with the training output of the nearest training
    instruction (TF-IDF over instruction + input, cosine)."""

    max_features: int = key(_TERMS, expected="an integer >= 0 (0 = all terms)", ge=0)
    ngram_max: int = key(_NGRAMS, ge=1)


class InstructConfig(_FineTune):
    """Instruction fine-tuning: next-token loss on the instruction examples, then
    responses to the validation and test instructions."""

    init: Literal["pretrained", "openai"] = key(
        "the start model: pretrained (our checkpoint) or openai (OpenAI's GPT-2, from the weights stage)"
    )
    trainable: Literal["all", "lora"] = key(
        "what trains: all, or lora (adapters on lora_targets; the checkpoint holds only those and names its base)",
        "all",
    )
    max_length: int = key("tokens per example, prompt and response together; longer ones are cut", ge=2)
    mask_prompt: bool = key("true: the loss covers the response tokens only")
    max_new_tokens: int = key("tokens generated per validation or test response", ge=0)
    repetition_penalty: float = key(
        "decoding: > 1 discourages tokens already generated; 1 = off", expected="a number > 0 (1 = off)", gt=0
    )
    no_repeat_ngram: int = key(
        "decoding: forbid repeating a generated n-gram of this length; 0 = off",
        expected="an integer >= 0 (0 = off)",
        ge=0,
    )
    judge_url: str = key(
        "OpenAI-compatible endpoint of a judge model, e.g. http://localhost:11434/v1 (Ollama); empty = no judging"
    )
    judge_model: str = key("the judge model's name at judge_url")
    batching: Batching = key(_BATCHING)
    drop_rate: float | None = key(
        "dropout while fine-tuning; null = the start model's", expected=_START_DROP_RATE, ge=0, lt=1
    )
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset(
        {"max_new_tokens", "repetition_penalty", "no_repeat_ngram", "judge_url", "judge_model"}
    )


class ExportConfig(Section):
    """The ONNX export of the spam classifier, checked against PyTorch on the test split."""

    opset: int = key("ONNX opset of the exported graph", expected="an ONNX opset >= 17", ge=17)
    parity_atol: float = key(
        "largest |logit_onnx - logit_torch| allowed on the test split", expected="a tolerance > 0", gt=0
    )
    batch_size: int = key("rows per run for the parity check and the accuracy figures", ge=1)
    int8: bool = key("also write a dynamic-quantized int8 copy, kept only if it passes int8_max_drop")
    int8_max_drop: float = key(
        "accuracy points (0-100) the int8 copy may lose against fp32 on the test split",
        expected="accuracy points >= 0",
        ge=0,
    )
    min_test_accuracy: float = key(
        "the quality gate: a classifier below this test accuracy is neither exported nor packaged",
        expected="a fraction in [0, 1]",
        ge=0,
        le=1,
    )


class PackageConfig(Section):
    """The BentoML model store entry that the service runs."""

    model_name: str = key("BentoML model store name; the version is the variant and a sha256 prefix of the ONNX file")
    variant: Literal["fp32", "int8"] = key("the ONNX file the service runs")


class WandbConfig(Section):
    """Weights & Biases: every training run is recorded."""

    project: str = key("W&B project of the runs")
    entity: str = key("W&B team or user; empty = the account's default")
    mode: Literal["offline", "online", "disabled"] = key(
        "offline (no account needed; `wandb sync` uploads later), online or disabled"
    )


class Params(Section):
    """The whole of params.yaml, parsed. A stage reads only its own section."""

    paths: Paths
    data: DataConfig
    prepare: PrepareConfig
    pretrain: PretrainConfig
    weights: WeightsConfig
    finetune_spam: SpamConfig
    baseline_spam: BaselineConfig
    finetune_instruct: InstructConfig
    baseline_instruct: BaselineInstructConfig
    export_onnx: ExportConfig
    package: PackageConfig
    wandb: WandbConfig


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = (), profile: str | None = None) -> Params:
    """The entry point's one call: params.yaml + profile + overrides, parsed into `Params`."""
    from .profiles import merged_params

    return Params.parse(merged_params(path, overrides or (), profile), "params")

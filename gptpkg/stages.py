"""Pipeline stages: plain functions of (params, paths) that write their declared outputs
atomically and return a metrics dict (also written as JSON).

`params` is the whole parsed `params.yaml`; each stage reads its own section, the
`paths` section (every file and folder the pipeline uses, declared once) and `data`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from .checkpoint import atomic_write_text
from .config import ConfigError, from_dict, section, split_train

# Sources a pretraining corpus can name: raw text files, and the SMS messages outside
# the spam test split (domain-adaptive pretraining; test texts are never included).
TEXT_SOURCES = ("the-verdict.txt", "tinyshakespeare.txt")
SMS_SOURCE = "sms"
CORPUS_SOURCES = TEXT_SOURCES + (SMS_SOURCE,)
CORPUS_TOKENIZER = "tokenizer.json"  # in processed/corpus: {"tokenizer": name} (prepare writes it)
RAW_FILES = ("the-verdict.txt", "tinyshakespeare.txt", "SMSSpamCollection", "instruction-data.json")
# What the spam classifier trains on: the book's balanced train split, every message of
# the collection whose text is neither a validation nor a test text (imbalanced), or
# every message holding no test text (`all` plus the validation messages: its val
# figures are then not held out; finetune_spam's CV still folds over the `all` part).
SPAM_TRAIN_DATA = ("book", "all", "nontest")
# What pretraining's next-token softmax runs over: every GPT-2 token, or only the tokens
# of its corpus (train and val parts; `GPT.set_lm_vocab`).
LM_VOCABS = ("full", "corpus")


def text_key(text: str) -> str:
    """A message's identity for leak checks. The book's split reads the file with
    pandas' quoting, which strips the quotes around some messages, so two readings of one
    message differ only in double quotes and whitespace; case is folded to be strict."""
    return " ".join(text.replace('"', "").split()).casefold()


def contains_any(text: str, keys: set[str]) -> bool:
    """Whether the text of a message holds any of `keys` (text_key forms): strict, so a
    longer message quoting a test message ("Sorry, I'll call later in meeting" holds the
    test text "Sorry, I'll call later") is kept out of training data too."""
    k = text_key(text)
    return any(h in k for h in keys)


# ---------------------------------------------------------------------------------
# Stage configs: one frozen dataclass per params section (training keys split off).


@dataclass(frozen=True)
class Paths:
    raw: str
    processed: str
    pretrained: str
    spam_classifier: str
    instruct_model: str
    metrics: str
    plots: str
    onnx: str
    wandb: str


@dataclass(frozen=True)
class DataConfig:
    mirror: str
    files: list[str]
    timeout_s: float
    retries: int


@dataclass(frozen=True)
class PrepareConfig:
    seed: int
    pretrain_train_ratio: float
    spam_split: str  # book | full
    instruct_seed: int
    tokenizer: str  # gpt2 | gpt2-digits (tokenizer.TOKENIZERS): the pretraining corpus's, hence every model's


@dataclass(frozen=True)
class PretrainConfig:
    model: str
    drop_rate: float
    vocab_multiple: int  # pad the vocabulary to a multiple of this (64 on GPUs; 1 = none)
    corpus: list[str]
    lm_vocab: str  # full | corpus (see LM_VOCABS)
    max_length: int
    stride: int
    sample_prompt: str
    sample_tokens: int
    # own keys that act only after or beside training (see `training_params`)
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"sample_prompt", "sample_tokens"})


@dataclass(frozen=True)
class SpamConfig:
    init: str  # pretrained | openai | scratch
    openai_weights: str
    model: str  # preset, used only with init=scratch
    trainable: str  # head | last_blocks | all
    n_blocks: int
    max_length: int
    class_weights: list[float] | None
    # s > 0: train towards 1 - s on the label and s spread over both classes; 0 = off.
    label_smoothing: float
    batching: str  # bucketed | shuffled | pad_longest (the book's: pad to the longest text)
    pooling: str  # last_real_token | mean (config.POOLINGS)
    # How each message's tokens are framed: plain | eot (tokenizer.FRAMINGS, encode_message).
    framing: str
    # Dropout while fine-tuning; None = the start model's (the pretraining drop_rate).
    drop_rate: float | None
    train_data: str  # book | all | nontest (see SPAM_TRAIN_DATA)
    # Keep the token embedding (50257 x emb_dim, most of a small model's weights) as
    # pretrained.
    freeze_embeddings: bool
    # k > 0: also k-fold cross-validate on the training messages (k fresh classifiers from
    # the same init; cv_* metrics); 0 = off. Val and test are never part of it.
    cv_folds: int
    # n > 1: fine-tune n copies of the start model (seeds seed, seed+1, ...) and average
    # their weights into the one classifier (a uniform model soup); 1 = one fine-tuning.
    soup: int
    # The spam share the classifier decides for (a spam-logit offset after training,
    # `finetune.decision_offset`); None = the class-weighted mix it was trained on.
    decision_spam_share: float | None
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"openai_weights", "cv_folds", "decision_spam_share"})


@dataclass(frozen=True)
class BaselineConfig:
    max_features: int
    ngram_max: int
    C: float
    train_data: str  # book | all, as finetune_spam.train_data


@dataclass(frozen=True)
class InstructConfig:
    init: str  # pretrained | openai
    openai_weights: str
    max_length: int
    mask_prompt: bool
    max_new_tokens: int
    judge_url: str
    judge_model: str
    batching: str  # bucketed | shuffled | pad_longest
    drop_rate: float | None  # dropout while fine-tuning; None = the start model's
    AFTER_TRAINING: ClassVar[frozenset[str]] = frozenset({"openai_weights", "max_new_tokens", "judge_url",
                                                          "judge_model"})


@dataclass(frozen=True)
class WandbConfig:
    project: str
    entity: str
    mode: str  # offline | online | disabled


def paths_of(params: dict) -> Paths:
    return from_dict(Paths, section(params, "paths"), "params.paths")


def stage_config(params: dict, name: str, cls: type) -> tuple[Any, Any]:
    """(stage config, TrainConfig or None) for section `name`."""
    sec = section(params, name)
    own, train = split_train(sec, f"params.{name}") if cls in (PretrainConfig, SpamConfig, InstructConfig) else (sec, None)
    return from_dict(cls, own, f"params.{name}"), train


def training_params(own: Any) -> dict[str, Any]:
    """The keys of a training stage's own config (`stage_config`'s first value) that shape
    its trained weights: all but its class's AFTER_TRAINING keys (generation, judging,
    cross-validation, the decision rule, and the path of OpenAI's weights, whose use
    `init` records). A checkpoint records them (meta "stage_params") beside the
    TrainConfig keys (meta "train"), so `--resume` compares both."""
    return {k: v for k, v in asdict(own).items() if k not in type(own).AFTER_TRAINING}


def write_metrics(paths: Paths, stage: str, metrics: dict[str, Any]) -> Path:
    out = Path(paths.metrics) / f"{stage}.json"
    atomic_write_text(out, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return out


def mirror_of(params: dict) -> str | None:
    import os

    from .fetch import MIRROR_ENV

    data = from_dict(DataConfig, section(params, "data"), "params.data")
    return os.environ.get(MIRROR_ENV) or data.mirror or None


# ---------------------------------------------------------------------------------
# fetch, prepare


def fetch(params: dict) -> dict[str, Any]:
    from .fetch import fetch_file

    paths = paths_of(params)
    data = from_dict(DataConfig, section(params, "data"), "params.data")
    mirror = mirror_of(params)
    how = {}
    for name in data.files:
        _, how[name] = fetch_file(name, paths.raw, mirror=mirror, timeout=data.timeout_s, retries=data.retries)
    return {"files": how}


def prepare(params: dict) -> dict[str, Any]:
    """Tokenize once: pretraining token arrays per source, spam and instruction splits."""
    import numpy as np

    from .data import book_spam_splits, full_spam_splits, read_instructions, split_instructions, split_text
    from .fetch import verify_file
    from .tokenizer import TOKENIZERS, get_tokenizer

    paths = paths_of(params)
    cfg, _ = stage_config(params, "prepare", PrepareConfig)
    if cfg.spam_split not in ("book", "full"):
        raise ConfigError(f"params.prepare.spam_split: expected book|full, got {cfg.spam_split!r}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ConfigError(f"params.prepare.tokenizer: expected one of {list(TOKENIZERS)}, got {cfg.tokenizer!r}")
    raw = Path(paths.raw)
    tok = get_tokenizer(mirror_of(params), cfg.tokenizer)
    out = Path(paths.processed)
    metrics: dict[str, Any] = {}

    sms_file = verify_file(raw / "SMSSpamCollection", "SMSSpamCollection")
    splits = (book_spam_splits if cfg.spam_split == "book" else full_spam_splits)(sms_file, seed=cfg.seed)
    test_keys = {text_key(t) for t, _ in splits.test}
    # Texts for domain-adaptive pretraining: every message (correct parsing) that holds
    # no test text; duplicates of test messages and messages quoting one are left out.
    from .data import read_sms_spam

    messages = read_sms_spam(sms_file)
    sms_corpus = [t for t, _ in messages if not contains_any(t, test_keys)]
    texts = {name: verify_file(raw / name, name).read_text(encoding="utf-8") for name in TEXT_SOURCES}
    texts[SMS_SOURCE] = "<|endoftext|>".join(sms_corpus)

    arrays = {}
    for name, text in texts.items():
        tr, va = split_text(text, cfg.pretrain_train_ratio)
        for part, t in (("train", tr), ("val", va)):
            ids = tok.encode(t, allowed_special={"<|endoftext|>"})
            arrays[f"{name}.{part}"] = np.asarray(ids, dtype=np.uint16)
            metrics[f"tokens/{name}.{part}"] = len(ids)

    def write(tmp: Path) -> None:
        (tmp / "corpus").mkdir()
        for key, arr in arrays.items():
            np.save(tmp / "corpus" / f"{key}.npy", arr)
        (tmp / "corpus" / CORPUS_TOKENIZER).write_text(json.dumps({"tokenizer": tok.name}) + "\n", encoding="utf-8")
        (tmp / "spam").mkdir()
        # "all": every message of the collection (correct parsing, 5,574), from which
        # finetune_spam.train_data=all and the held-out figures are drawn.
        for part, rows in {**splits.as_dict(), "all": messages}.items():
            lines = [json.dumps({"text": t, "label": y}) for t, y in rows]
            (tmp / "spam" / f"{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            metrics[f"spam/{part}"] = len(rows)
            metrics[f"spam/{part}_spam_share"] = round(sum(y for _, y in rows) / len(rows), 4)
        instr = split_instructions(read_instructions(verify_file(raw / "instruction-data.json", "instruction-data.json")), cfg.instruct_seed)
        (tmp / "instruct").mkdir()
        for part, rows in instr.items():
            (tmp / "instruct" / f"{part}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
            metrics[f"instruct/{part}"] = len(rows)

    from .checkpoint import atomic_dir

    with atomic_dir(out) as tmp:
        write(tmp)
    metrics["sms_corpus_messages"] = len(sms_corpus)
    metrics["tokenizer"] = tok.name
    return metrics


def read_spam_split(paths: Paths, part: str) -> list[tuple[str, int]]:
    f = Path(paths.processed) / "spam" / f"{part}.jsonl"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing; run the prepare stage first")
    return [(r["text"], int(r["label"])) for r in map(json.loads, f.read_text(encoding="utf-8").splitlines()) if r]


def spam_train_rows(paths: Paths, train_data: str, where: str) -> list[tuple[str, int]]:
    """The classifier's training messages: the split's own train part (`book`), every
    message that holds no validation or test text (`all`, imbalanced), or every message
    that holds no test text (`nontest`: `all` plus the validation messages and their
    repeats, in the collection's order)."""
    if train_data not in SPAM_TRAIN_DATA:
        raise ConfigError(f"{where}.train_data: expected one of {list(SPAM_TRAIN_DATA)}, got {train_data!r}")
    if train_data == "book":
        return read_spam_split(paths, "train")
    parts = ("test",) if train_data == "nontest" else ("val", "test")
    held = {text_key(t) for part in parts for t, _ in read_spam_split(paths, part)}
    return [r for r in read_spam_split(paths, "all") if not contains_any(r[0], held)]


def heldout_full_rows(paths: Paths, train_rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """All messages of the collection minus those whose text was trained on: the
    imbalanced (~13% spam) traffic a deployed classifier meets."""
    seen = {text_key(t) for t, _ in train_rows}
    return [r for r in read_spam_split(paths, "all") if text_key(r[0]) not in seen]


def traffic_metrics(paths: Paths, metrics: dict) -> dict[str, float]:
    """`heldout_full` accuracy and spam F1 re-weighted to the whole collection's spam
    share (~13%): what the held-out recalls give on real, imbalanced traffic even when
    the held-out set itself is not (with train_data=all it is only val + test)."""
    from .metrics import at_spam_share

    labels = [y for _, y in read_spam_split(paths, "all")]
    share = sum(labels) / len(labels)
    return {"collection_spam_share": share,
            **at_spam_share(metrics["heldout_full_confusion"], share, "heldout_traffic_")}


def corpus_tokenizer(paths: Paths) -> str:
    """The tokenizer the prepared corpus was encoded with (prepare's `tokenizer`, recorded
    in corpus/tokenizer.json; gpt2 for a corpus prepared before it was recorded)."""
    from .tokenizer import DEFAULT_TOKENIZER, check_tokenizer

    f = Path(paths.processed) / "corpus" / CORPUS_TOKENIZER
    if not f.is_file():
        return DEFAULT_TOKENIZER
    try:
        name = json.loads(f.read_text(encoding="utf-8"))["tokenizer"]
    except (ValueError, KeyError, TypeError) as e:
        from .data import DataError

        raise DataError(f"{f}: expected {{\"tokenizer\": NAME}} ({type(e).__name__}: {e}); rerun prepare") from None
    return check_tokenizer(name, str(f))


def read_corpus(paths: Paths, sources: list[str], part: str):
    """Token ids of the chosen sources for `part`, joined by <|endoftext|>."""
    import numpy as np

    from .tokenizer import EOT_ID

    unknown = [s for s in sources if s not in CORPUS_SOURCES]
    if unknown or not sources:
        raise ConfigError(f"params.pretrain.corpus: unknown source(s) {unknown}; expected a non-empty "
                          f"list from {list(CORPUS_SOURCES)}")
    pieces = []
    for s in sources:
        f = Path(paths.processed) / "corpus" / f"{s}.{part}.npy"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing; run the prepare stage first")
        pieces.append(np.load(f).astype(np.int64))
        pieces.append(np.asarray([EOT_ID], dtype=np.int64))
    ids = np.concatenate(pieces[:-1])
    if len(ids) <= len(sources) - 1:  # nothing but separators
        from .data import DataError

        raise DataError(f"params.pretrain.corpus {sources}: the {part} split in {paths.processed}/corpus "
                        f"holds no tokens; choose other sources or rerun prepare")
    return ids


# ---------------------------------------------------------------------------------
# Profiles for DVC: `dvc repro` reads params.yaml only, so a profile is applied by
# writing its keys into params.yaml (comments kept); `git diff params.yaml` shows it.

SECTION_CONFIGS = {"paths": Paths, "data": DataConfig, "prepare": PrepareConfig, "pretrain": PretrainConfig,
                   "finetune_spam": SpamConfig, "baseline_spam": BaselineConfig,
                   "finetune_instruct": InstructConfig, "wandb": WandbConfig}


def validate_params(params: dict, sections: list[str] | None = None) -> None:
    """Parse `sections` (default: every section this module knows that params holds);
    an unknown key, a wrong type or a missing section raises ConfigError."""
    for name in sections if sections is not None else [n for n in SECTION_CONFIGS if n in params]:
        stage_config(params, name, SECTION_CONFIGS[name])


def apply_profile(params_file: str | Path, profile: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """Write profiles/<profile>.yaml, then the `section.key=value` overrides, over
    `params_file` in place. Returns the changed keys ("section.key"). Nothing is written
    when nothing changes or the result would not parse."""
    import io

    import yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    from .config import load_params, read_yaml

    params_file = Path(params_file)
    merged = load_params(params_file, list(overrides), profile)  # unknown profile/key -> ConfigError
    validate_params(merged)
    base = read_yaml(params_file)
    rt = YAML()  # round trip: comments and key order stay
    rt.preserve_quotes = True
    rt.width = 4096
    # Written so every YAML 1.1 reader (PyYAML) reads the same values back: 5e-05 would be
    # a string there (needs "5.0e-05"), and null stays spelled out.
    rt.representer.add_representer(
        float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", yaml.safe_dump(v).split("\n")[0]))
    rt.representer.add_representer(type(None), lambda r, v: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_file.read_text(encoding="utf-8"))
    changed = []
    for sec, keys in merged.items():
        for key, value in (keys.items() if isinstance(keys, dict) else ()):
            if (base.get(sec) or {}).get(key) == value:
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

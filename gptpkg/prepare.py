"""The `prepare` stage, and the readers of what it writes.

Tokenizes once: pretraining token arrays per corpus source (train/val), the spam splits
(train/val/test, plus every message as `all`) and the instruction splits. The spam test
split is never part of any training data: pretraining's SMS corpus and the classifier's
`all` training data leave out every message that holds a test text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Paths, PrepareConfig
from .data import DataError

# Sources a pretraining corpus can name: raw text files, the SMS messages outside the
# spam test split, and the instruction split's training records in the prompt format
# (domain-adaptive pretraining for the classifier and the instruction model).
TEXT_SOURCES = ("the-verdict.txt", "tinyshakespeare.txt")
SMS_SOURCE = "sms"
INSTRUCTIONS_SOURCE = "instructions"


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


def run(cfg: PrepareConfig, ctx) -> dict[str, Any]:
    import numpy as np

    from .data import (
        book_spam_splits,
        format_prompt,
        format_response,
        full_spam_splits,
        read_instructions,
        read_sms_spam,
        split_instructions,
        split_text,
    )
    from .fetch import verify_file
    from .files import atomic_dir
    from .tokenizer import END_OF_TEXT, get_tokenizer

    raw = Path(ctx.paths.raw)
    tok = get_tokenizer(ctx.mirror)
    metrics: dict[str, Any] = {}
    sms_file = verify_file(raw / "SMSSpamCollection", "SMSSpamCollection")
    splits = (book_spam_splits if cfg.spam_split == "book" else full_spam_splits)(sms_file, seed=cfg.seed)
    test_keys = {text_key(t) for t, _ in splits.test}
    messages = read_sms_spam(sms_file)
    sms_corpus = [t for t, _ in messages if not contains_any(t, test_keys)]
    texts = {name: verify_file(raw / name, name).read_text(encoding="utf-8") for name in TEXT_SOURCES}
    texts[SMS_SOURCE] = END_OF_TEXT.join(sms_corpus)
    instructions = split_instructions(
        read_instructions(verify_file(raw / "instruction-data.json", "instruction-data.json")), cfg.instruct_seed
    )
    # Training records only: the instruction val/test splits never reach pretraining.
    texts[INSTRUCTIONS_SOURCE] = END_OF_TEXT.join(format_prompt(e) + format_response(e) for e in instructions["train"])

    with atomic_dir(ctx.paths.processed) as tmp:
        (tmp / "corpus").mkdir()
        for name, text in texts.items():
            for part, t in zip(("train", "val"), split_text(text, cfg.pretrain_train_ratio)):
                ids = np.asarray(tok.encode(t, allowed_special={END_OF_TEXT}), dtype=np.uint16)
                np.save(tmp / "corpus" / f"{name}.{part}.npy", ids)
                metrics[f"tokens/{name}.{part}"] = len(ids)
        (tmp / "spam").mkdir()
        # "all": every message of the collection (5,574), from which finetune_spam's
        # train_data=all and the held-out figures are drawn.
        for part, rows in {**splits.as_dict(), "all": messages}.items():
            lines = [json.dumps({"text": t, "label": y}) for t, y in rows]
            (tmp / "spam" / f"{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            metrics[f"spam/{part}"] = len(rows)
            metrics[f"spam/{part}_spam_share"] = round(sum(y for _, y in rows) / len(rows), 4)
        (tmp / "instruct").mkdir()
        for part, rows in instructions.items():
            (tmp / "instruct" / f"{part}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
            metrics[f"instruct/{part}"] = len(rows)
    metrics["sms_corpus_messages"] = len(sms_corpus)
    return metrics


# ---------------------------------------------------------------------------------
# Readers of the prepared data


def read_spam_split(paths: Paths, part: str) -> list[tuple[str, int]]:
    f = Path(paths.processed) / "spam" / f"{part}.jsonl"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing; run the prepare stage first")
    return [(r["text"], int(r["label"])) for r in map(json.loads, f.read_text(encoding="utf-8").splitlines()) if r]


def read_instruct_split(paths: Paths, part: str) -> list[dict]:
    f = Path(paths.processed) / "instruct" / f"{part}.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing; run the prepare stage first")
    return json.loads(f.read_text(encoding="utf-8"))


def spam_train_rows(paths: Paths, train_data: str) -> list[tuple[str, int]]:
    """The classifier's training messages: the split's own train part (`book`), or every
    message that holds no validation or test text (`all`, imbalanced)."""
    if train_data == "book":
        return read_spam_split(paths, "train")
    held = {text_key(t) for part in ("val", "test") for t, _ in read_spam_split(paths, part)}
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
    return {
        "collection_spam_share": share,
        **at_spam_share(metrics["heldout_full_confusion"], share, "heldout_traffic_"),
    }


def read_corpus(paths: Paths, sources: list[str], part: str):
    """Token ids of the chosen sources for `part`, joined by <|endoftext|>."""
    import numpy as np

    from .tokenizer import EOT_ID

    pieces = []
    for s in sources:
        f = Path(paths.processed) / "corpus" / f"{s}.{part}.npy"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing; run the prepare stage first")
        pieces += [np.load(f).astype(np.int64), np.asarray([EOT_ID], dtype=np.int64)]
    ids = np.concatenate(pieces[:-1])
    if len(ids) <= len(sources) - 1:  # nothing but separators
        raise DataError(
            f"params.pretrain.corpus {sources}: the {part} split in {paths.processed}/corpus "
            f"holds no tokens; choose other sources or rerun prepare"
        )
    return ids

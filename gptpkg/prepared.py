"""Readers of what the `prepare` stage writes, and the rules that keep the spam test
split out of every training set (`text_key`, `contains_any`)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Paths
from .data import DataError
from .shards import TokenStream, corrupt, split_stream

# Sources a pretraining corpus can name: raw text files, the SMS messages outside the
# spam test split, and the instruction split's training records in the prompt format
# (domain-adaptive pretraining for the classifier and the instruction model).
TEXT_SOURCES = ("the-verdict.txt", "tinyshakespeare.txt")
SMS_SOURCE = "sms"
INSTRUCTIONS_SOURCE = "instructions"
CORPUS_SOURCE = "corpus"  # the user's own folder (paths.corpus)
HF_SOURCE = "hf"  # a Hugging Face dataset, streamed (prepare.hf_dataset)


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


def _prepared_text(f: Path) -> str:
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing; run the prepare stage first")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise corrupt(f, f"not UTF-8 ({e})") from None


def read_spam_split(paths: Paths, part: str) -> list[tuple[str, int]]:
    f = Path(paths.processed) / "spam" / f"{part}.jsonl"
    rows = []
    for n, line in enumerate(_prepared_text(f).splitlines(), 1):
        if not line:
            continue
        try:
            r = json.loads(line)
            rows.append((str(r["text"]), int(r["label"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise corrupt(f, f"line {n} is not a {{text, label}} record ({type(e).__name__}: {e})") from None
    return rows


def read_instruct_split(paths: Paths, part: str) -> list[dict]:
    f = Path(paths.processed) / "instruct" / f"{part}.json"
    try:
        rows = json.loads(_prepared_text(f))
    except json.JSONDecodeError as e:
        raise corrupt(f, f"not valid JSON ({e}): truncated?") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise corrupt(f, "not a JSON list of instruction records")
    return rows


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


def read_corpus(paths: Paths, sources: list[str], part: str) -> TokenStream:
    """The `part` split of the chosen sources, one stream over their memory-mapped token
    shards (every document ends with <|endoftext|>); shards checked against the manifest."""
    stream = split_stream(Path(paths.processed) / "corpus", sources, part)
    if not len(stream):
        hint = f" (put your text in {paths.corpus} and rerun prepare)" if CORPUS_SOURCE in sources else ""
        raise DataError(
            f"params.pretrain.corpus {sources}: the {part} split in {paths.processed}/corpus "
            f"holds no tokens; choose other sources or rerun prepare{hint}"
        )
    return stream

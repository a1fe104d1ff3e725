"""Datasets: pretraining windows, SMS spam splits, Alpaca-style instruction data.

Batches are dicts of tensors:
- language modelling: {"input_ids": (B, T), "targets": (B, T)}, -100 targets ignored
- classification: {"input_ids": (B, T), "lengths": (B,), "labels": (B,)}, right-padded
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import GptpkgError
from .tokenizer import PAD_ID, encode_message

IGNORE_INDEX = -100
SPAM_LABELS = ("ham", "spam")


class DataError(GptpkgError, ValueError):
    """An input file or split has the wrong shape, is empty or too short."""


# ---------------------------------------------------------------------------------
# Pretraining


class TokenWindows(Dataset):
    """Sliding windows over one token stream: input ids[i:i+L], targets ids[i+1:i+L+1],
    for i = 0, stride, 2*stride, ... (the book's GPTDatasetV1). The stream is a
    `shards.TokenStream` (memory-mapped shards: a window is copied out when asked for,
    never the stream) or a sequence of ids."""

    def __init__(self, ids, max_length: int, stride: int) -> None:
        from .shards import TokenStream

        if not isinstance(ids, TokenStream):
            ids = TokenStream([torch.as_tensor(ids, dtype=torch.long).numpy()])
        if max_length < 1 or stride < 1:
            raise DataError(f"max_length and stride must be >= 1, got {max_length}, {stride}")
        if len(ids) < max_length + 1:
            raise DataError(
                f"a token stream of {len(ids)} tokens is too short for one window of "
                f"max_length={max_length} (needs {max_length + 1})"
            )
        self.ids, self.max_length, self.stride = ids, max_length, stride
        self.n = len(range(0, len(ids) - max_length, stride))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        chunk = torch.from_numpy(self.ids.read(s, s + self.max_length + 1))
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}


def split_text(text: str, train_ratio: float) -> tuple[str, str]:
    """The book's character split: first `train_ratio` of the text trains."""
    if not text.strip():
        raise DataError("the pretraining corpus is empty")
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------
# SMS spam


@dataclass(frozen=True)
class SpamSplits:
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def as_dict(self) -> dict[str, list[tuple[str, int]]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def read_sms_spam(path: str | Path, book_quoting: bool = False) -> list[tuple[str, int]]:
    """(text, label) pairs, label 1 = spam.

    `book_quoting=True` reads as the book does (pandas' default quoting), which merges
    quoted lines into 5,572 rows; otherwise every one of the 5,574 lines is a message.
    """
    path = Path(path)
    if book_quoting:
        import pandas as pd

        df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
        rows = list(zip(df["Label"], df["Text"]))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [tuple(r) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    out = []
    for n, row in enumerate(rows, 1):
        if len(row) != 2 or row[0] not in SPAM_LABELS:
            raise DataError(f"{path}: row {n} is not 'ham|spam<TAB>text': {row!r:.80}")
        out.append((str(row[1]), SPAM_LABELS.index(row[0])))
    if not out:
        raise DataError(f"{path}: no messages")
    return out


def book_spam_splits(path: str | Path, seed: int = 123) -> SpamSplits:
    """The book's balanced split, reproduced exactly: pandas' default quoting, all spam
    plus as many ham sampled with `random_state=seed`, shuffled with `random_state=seed`,
    then 70/10/20."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    n_spam = int((df["Label"] == "spam").sum())
    ham = df[df["Label"] == "ham"].sample(n_spam, random_state=seed)
    balanced = pd.concat([ham, df[df["Label"] == "spam"]])
    balanced = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(balanced) * 0.7)
    val_end = train_end + int(len(balanced) * 0.1)
    rows = [(str(t), SPAM_LABELS.index(lbl)) for lbl, t in zip(balanced["Label"], balanced["Text"])]
    return SpamSplits(rows[:train_end], rows[train_end:val_end], rows[val_end:])


def full_spam_splits(path: str | Path, seed: int = 123, ratios=(0.7, 0.1, 0.2)) -> SpamSplits:
    """All 5,574 messages (correct parsing), stratified by label, imbalanced."""
    rows = read_sms_spam(path)
    rng = random.Random(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in (0, 1):
        group = [r for r in rows if r[1] == label]
        rng.shuffle(group)
        a = int(len(group) * ratios[0])
        b = a + int(len(group) * ratios[1])
        parts["train"] += group[:a]
        parts["val"] += group[a:b]
        parts["test"] += group[b:]
    for rows_ in parts.values():
        rng.shuffle(rows_)
    return SpamSplits(**parts)


class ClassificationDataset(Dataset):
    """Token ids of each text (`tokenizer.encode_message`: cut to `max_length`) and its
    label. Text is plain text: a literal "<|endoftext|>" in a message
    is not the special token (the ONNX server encodes the same way), and an empty text
    becomes one end token."""

    def __init__(self, rows: Sequence[tuple[str, int]], tokenizer, max_length: int) -> None:
        if not rows:
            raise DataError("classification split is empty")
        self.labels = [int(label) for _, label in rows]
        self.ids = [encode_message(tokenizer, text, max_length) for text, _ in rows]
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "label": self.labels[i]}

    def subset(self, indices: Sequence[int]) -> ClassificationDataset:
        """The items at `indices`, in that order (already tokenized: no second encode)."""
        if not indices:
            raise DataError("classification subset is empty")
        out = object.__new__(type(self))
        out.labels = [self.labels[i] for i in indices]
        out.ids = [self.ids[i] for i in indices]
        out.max_length = self.max_length
        return out


def stratified_group_folds(labels: Sequence[int], groups: Sequence, k: int, seed: int) -> list[list[int]]:
    """`k` disjoint folds of the indices 0..n-1 that together cover them, for k-fold
    cross-validation: items of one group (e.g. the same message text, which the SMS
    collection holds up to a dozen times) always share a fold, so no held-out text is
    also trained on; each class is spread over the folds as evenly as its groups allow.

    Deterministic from `seed`: per class (in label order) the groups are shuffled, then
    placed largest first, each into the fold holding the fewest items of that class so
    far (ties: the lowest fold). A group takes its first item's label. Each fold is
    sorted. Raises DataError if a class has fewer groups than `k` (a fold would miss it).
    """
    if len(labels) != len(groups):
        raise ValueError(f"need one group per label, got {len(labels)} labels and {len(groups)} groups")
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2, got {k}")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    by_class: dict[int, list] = {}
    for g, idx in members.items():
        by_class.setdefault(int(labels[idx[0]]), []).append(g)
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in sorted(by_class):
        gs = by_class[label]
        if len(gs) < k:
            raise DataError(f"label {label} has {len(gs)} distinct item group(s), fewer than k={k} folds")
        rng.shuffle(gs)
        gs.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the shuffled order
        count = [0] * k
        for g in gs:
            f = min(range(k), key=lambda j: (count[j], j))
            folds[f] += members[g]
            count[f] += len(members[g])
    return [sorted(f) for f in folds]


def classification_collate(items: list[dict], pad_to: int | None = None, pad_id: int = PAD_ID) -> dict:
    """Right-pad to the longest item (or to `pad_to`, as the book does) and keep lengths."""
    lengths = [len(it["input_ids"]) for it in items]
    T = max(lengths) if pad_to is None else max(pad_to, max(lengths))
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : lengths[row]] = torch.as_tensor(it["input_ids"], dtype=torch.long)
    return {
        "input_ids": ids,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
    }


# ---------------------------------------------------------------------------------
# Instruction data (Alpaca prompt format)

PROMPT_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def format_prompt(entry: dict) -> str:
    """Instruction (+ input) in the Alpaca format, ending before the response."""
    text = f"{PROMPT_HEAD}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(entry: dict) -> str:
    return f"\n\n### Response:\n{entry['output']}"


def read_instructions(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of records")
    for n, rec in enumerate(data):
        missing = {"instruction", "output"} - set(rec if isinstance(rec, dict) else {})
        if missing:
            raise DataError(f"{path}: record {n} lacks key(s) {sorted(missing)}")
    return data


def split_instructions(data: list[dict], seed: int, ratios=(0.85, 0.05, 0.10)) -> dict[str, list[dict]]:
    """Shuffle with `seed`, then train/val/test by `ratios` (test gets the rest)."""
    data = list(data)
    random.Random(seed).shuffle(data)
    a = int(len(data) * ratios[0])
    b = a + int(len(data) * ratios[1])
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


class InstructionDataset(Dataset):
    """Token ids of prompt + response, and how many of them are the prompt."""

    def __init__(self, entries: Sequence[dict], tokenizer) -> None:
        if not entries:
            raise DataError("instruction split is empty")
        self.items = []
        for e in entries:
            prompt = tokenizer.encode_ordinary(format_prompt(e))
            response = tokenizer.encode_ordinary(format_response(e))
            self.items.append({"input_ids": prompt + response, "prompt_len": len(prompt)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def instruction_collate(
    items: list[dict],
    pad_id: int = PAD_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Append one end token to each sequence, pad with end tokens to the longest (or to
    `pad_to` + 1: every batch as long as the longest example), shift by one for targets;
    targets keep the first end token and set the later padding to -100; `mask_prompt`
    sets the targets that predict prompt tokens to -100 too."""
    longest = max(max(len(it["input_ids"]) for it in items), pad_to or 0) + 1
    inputs, targets = [], []
    for it in items:
        seq = list(it["input_ids"]) + [pad_id]
        n_real = len(seq)  # includes the end token, which is a target
        seq += [pad_id] * (longest - len(seq))
        x = torch.tensor(seq[:-1])
        y = torch.tensor(seq[1:])
        # y[j] predicts seq[j+1]; seq[n_real-1] is the kept end token, so targets from
        # index n_real-1 on are padding.
        y[n_real - 1 :] = ignore_index
        if mask_prompt:
            # y[j] for j < prompt_len - 1 is a prompt token.
            y[: it["prompt_len"] - 1] = ignore_index
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return {"input_ids": torch.stack(inputs), "targets": torch.stack(targets)}

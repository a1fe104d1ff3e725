"""The `prepare` stage: tokenize once.

Writes the pretraining sources as token shards with a manifest (`gptpkg.shards`): the
bundled texts, the user's corpus folder (`paths.corpus`) and a Hugging Face dataset
streamed with `datasets` (`prepare.hf_dataset`) go through the same path
(`gptpkg.corpus`: parallel workers, a content-hash cache). Then the spam splits
(train/val/test, plus every message as `all`) and the instruction splits. The spam test
split is never part of any training data: pretraining's SMS corpus and the classifier's
`all` training data leave out every message that holds a test text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..config import PrepareConfig
from ..prepared import (
    CORPUS_SOURCE,
    HF_SOURCE,
    INSTRUCTIONS_SOURCE,
    SMS_SOURCE,
    TEXT_SOURCES,
    contains_any,
    text_key,
)


def run(cfg: PrepareConfig, ctx) -> dict[str, Any]:
    from ..corpus import Unit, corpus_files, default_workers, tokenize_units, write_shards
    from ..data import (
        book_spam_splits,
        format_prompt,
        format_response,
        full_spam_splits,
        read_instructions,
        read_sms_spam,
        split_instructions,
        split_text,
    )
    from ..files import atomic_dir
    from ..raw import verify_file
    from ..shards import write_manifest

    raw = Path(ctx.paths.raw)
    metrics: dict[str, Any] = {}
    sms_file = verify_file(raw / "SMSSpamCollection", "SMSSpamCollection")
    splits = (book_spam_splits if cfg.spam_split == "book" else full_spam_splits)(sms_file, seed=cfg.seed)
    test_keys = {text_key(t) for t, _ in splits.test}
    messages = read_sms_spam(sms_file)
    sms_corpus = [t for t, _ in messages if not contains_any(t, test_keys)]
    instructions = split_instructions(
        read_instructions(verify_file(raw / "instruction-data.json", "instruction-data.json")), cfg.instruct_seed
    )
    # A single text keeps the book's character cut; many documents split by whole documents.
    sources: dict[str, list[Unit]] = {}
    for name in TEXT_SOURCES:
        train, val = split_text(verify_file(raw / name, name).read_text(encoding="utf-8"), cfg.pretrain_train_ratio)
        sources[name] = [Unit(name, docs=((train, "train"), (val, "val")))]
    sources[SMS_SOURCE] = [Unit(SMS_SOURCE, docs=tuple((t, None) for t in sms_corpus))]
    # Training records only: the instruction val/test splits never reach pretraining.
    records = tuple((format_prompt(e) + format_response(e), None) for e in instructions["train"])
    sources[INSTRUCTIONS_SOURCE] = [Unit(INSTRUCTIONS_SOURCE, docs=records)]
    folder = Path(ctx.paths.corpus)
    files = corpus_files(folder)
    if files is None:
        print(f"prepare: no corpus folder {folder}: the source `corpus` is empty", file=sys.stderr)
    sources[CORPUS_SOURCE] = [Unit(f.relative_to(folder).as_posix(), path=str(f)) for f in files or ()]
    sources[HF_SOURCE] = [Unit(HF_SOURCE, hf=_hf_dataset(cfg))] if cfg.hf_dataset else []

    units = [u for us in sources.values() for u in us]
    cache = Path(ctx.paths.token_cache)
    done = tokenize_units(units, cache, cfg.workers or default_workers(), ctx.mirror)
    metrics["tokenized_units"] = sum(not r["cached"] for r in done)
    for r in done:
        for note in r["notes"]:
            print(f"prepare: skipped or repaired: {note}", file=sys.stderr)

    with atomic_dir(ctx.paths.processed) as tmp:
        shard_dir = tmp / "corpus"
        shard_dir.mkdir()
        entries: dict[str, Any] = {}
        at = 0
        for name, us in sources.items():
            entry = write_shards(
                shard_dir, name, done[at : at + len(us)], cache, 1 - cfg.pretrain_train_ratio, cfg.shard_tokens
            )
            at += len(us)
            if name == HF_SOURCE and us:
                entry["dataset"] = done[at - 1]["origin"]
            entries[name] = entry
            for part in ("train", "val"):
                metrics[f"tokens/{name}.{part}"] = entry[part]["tokens"]
            if name == CORPUS_SOURCE:
                metrics["corpus/files"] = entry["files"]
            if name in (CORPUS_SOURCE, HF_SOURCE):
                metrics[f"{name}/documents"] = entry["documents"]
                for what, n in entry["skipped"].items():
                    metrics[f"{name}/{what}"] = n
        write_manifest(shard_dir, entries, cfg.shard_tokens)
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


def _hf_dataset(cfg: PrepareConfig):
    from ..corpus import HFDataset

    return HFDataset(
        cfg.hf_dataset,
        config=cfg.hf_config,
        split=cfg.hf_split,
        revision=cfg.hf_revision,
        data_files=cfg.hf_data_files,
        text_field=cfg.hf_text_field,
        max_documents=cfg.hf_max_documents,
    )

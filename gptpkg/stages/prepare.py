"""The `prepare` stage: tokenize once.

Writes pretraining token arrays per corpus source (train/val), the spam splits
(train/val/test, plus every message as `all`) and the instruction splits. The spam test
split is never part of any training data: pretraining's SMS corpus and the classifier's
`all` training data leave out every message that holds a test text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import PrepareConfig
from ..prepared import INSTRUCTIONS_SOURCE, SMS_SOURCE, TEXT_SOURCES, contains_any, text_key


def run(cfg: PrepareConfig, ctx) -> dict[str, Any]:
    import numpy as np

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
    from ..tokenizer import END_OF_TEXT, get_tokenizer

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

"""Fine-tuning batches: length-bucketed vs pad-to-longest (the book's) vs shuffled.

    GPTPKG_DATA_MIRROR=/work/shared/data PYTHONPATH=. python bench/finetune_batching.py

Classifier: the book's balanced SMS split (`book_spam_splits`), the same initial
weights (`--preset`, from scratch: no pretrained GPT-2 weights exist here) and the same
hyperparameters, trained through `fit` with each `batching` of `finetune_spam`:
`pad_longest` pads every message to the longest in the training set (the book: 120
tokens), `shuffled` pads each random batch to its longest, `bucketed` groups messages
of similar length. Reports training examples/s (median over interleaved repetitions)
and the val/test accuracy each reaches; repetition r uses batch-order seed `--seed` + r
(the same for every mode), so the accuracies are over as many seeds as repetitions. Instruction batches: the same for
`finetune_instruct` (`pad_longest`, `shuffled` = the book's per-batch padding, `bucketed`) on `--instruct-examples`
training records, with the val loss each reaches.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import typing
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpkg.config import Batching, TrainConfig, key  # noqa: E402
from gptpkg.data import (  # noqa: E402
    ClassificationDataset,
    InstructionDataset,
    book_spam_splits,
    classification_collate,
    instruction_collate,
    read_instructions,
    split_instructions,
)
from gptpkg.finetune import finetune_plan  # noqa: E402
from gptpkg.loggers import NullLogger  # noqa: E402
from gptpkg.metrics import classification_metrics  # noqa: E402
from gptpkg.model import GPT, GPTClassifier  # noqa: E402
from gptpkg.perf import keep_freed_memory  # noqa: E402
from gptpkg.presets import model_config  # noqa: E402
from gptpkg.stages.finetune_spam import predict_proba  # noqa: E402
from gptpkg.tokenizer import get_tokenizer  # noqa: E402
from gptpkg.train import RunPlan, Task, batches_of, classification_loss, fit, lm_loss, mean_loss  # noqa: E402

# What `fit` takes as `ctx`: no logging, no resume, no progress bars.
QUIET = SimpleNamespace(logger=NullLogger(), resume=False, progress=False)


def run_name(mode: str, sparse_embedding: bool) -> str:
    """`bucketed`, or `bucketed+dense_embedding` for the run without the row-sparse
    embedding (`TrainConfig.sparse_embedding=false`: dense AdamW over all 50,257 rows)."""
    return mode if sparse_embedding else f"{mode}+dense_embedding"


class Section(TrainConfig):
    """The keys of a fine-tuning section that its run plan reads besides TrainConfig's."""

    batching: Batching = key("how batches are drawn", default="bucketed")
    max_length: int = key("the padding cap of a compiled plan (these runs do not compile)", default=1024)


def plan_for(mode: str, model, train_set, cfg: TrainConfig, collate) -> RunPlan:
    """The run plan a fine-tuning section with `batching: mode` gets."""
    return finetune_plan(Section(**cfg.model_dump(), batching=mode), model, train_set, collate)


def accuracy(model, dataset) -> float:
    """Accuracy at the 0.5 decision, as finetune_spam reports it."""
    predicted = [int(p > 0.5) for p in predict_proba(model, dataset, 32)]
    return classification_metrics(dataset.labels, predicted)["accuracy"]


def padded_tokens(plan, lengths, collate_pad: int | None) -> int:
    return sum(len(b) * (collate_pad or max(lengths[i] for i in b)) for b in plan)


def spam(args, mirror: Path, tok) -> dict:
    splits = book_spam_splits(mirror / "SMSSpamCollection", seed=123)
    sets = {p: ClassificationDataset(rows, tok, args.max_length) for p, rows in splits.as_dict().items()}
    lengths = [len(ids) for ids in sets["train"].ids]
    torch.manual_seed(args.seed)
    base = GPTClassifier(GPT(model_config(args.preset, drop_rate=0.0)), 2)
    base.set_trainable(args.trainable, 1)
    cfg = TrainConfig(
        lr=args.lr,
        warmup_steps=10,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_every=0,
        seed=args.seed,
        device="cpu",
        compile=False,
        beta2=0.999,
    )
    out: dict = {
        "train_examples": len(lengths),
        "mean_length": statistics.mean(lengths),
        "longest": max(lengths),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "preset": args.preset,
        "trainable": args.trainable,
    }
    runs = [(m, True) for m in args.modes] + [(m, False) for m in args.modes if args.dense_embedding_too]
    rates = {run_name(m, e): [] for m, e in runs}
    for rep in range(args.reps):
        for mode, emb in runs:
            rep_cfg = cfg.replace(seed=args.seed + rep, sparse_embedding=emb)  # each repetition its own batch order
            model = copy.deepcopy(base)
            plan = plan_for(mode, model, sets["train"], rep_cfg, classification_collate)
            r = fit(model, plan, Task(sets["train"], classification_loss()), QUIET)
            mode = run_name(mode, emb)
            rates[mode].append(r.examples_seen / r.wall_time_s)
            row = out.setdefault(mode, {})
            row["padded_tokens_per_epoch"] = padded_tokens(
                plan.batches(0), lengths, max(lengths) if mode.startswith("pad_longest") else None
            )
            for part in ("val", "test"):
                row.setdefault(f"{part}_accuracy", []).append(accuracy(model, sets[part]))
            print(
                f"spam rep {rep + 1} {mode}: {rates[mode][-1]:.1f} examples/s, val acc "
                f"{row['val_accuracy'][-1]:.4f}, test acc {row['test_accuracy'][-1]:.4f}",
                flush=True,
            )
    speedups(out, rates)
    return out


def instruct(args, mirror: Path, tok) -> dict:
    data = split_instructions(read_instructions(mirror / "instruction-data.json"), seed=123)
    train = InstructionDataset(data["train"][: args.instruct_examples], tok)
    val = InstructionDataset(data["val"], tok)
    collate = partial(instruction_collate, allowed_max_length=args.instruct_max_length)
    val_batches = batches_of(val, collate, args.batch_size)
    lengths = [len(it["input_ids"]) for it in train.items]
    torch.manual_seed(args.seed)
    base = GPT(model_config(args.preset, drop_rate=0.0))
    cfg = TrainConfig(
        lr=5e-4,
        warmup_steps=2,
        epochs=1.0,
        batch_size=args.batch_size,
        eval_every=0,
        seed=args.seed,
        device="cpu",
        compile=False,
    )
    out: dict = {"train_examples": len(lengths), "mean_length": statistics.mean(lengths), "longest": max(lengths)}
    rates: dict[str, list[float]] = {m: [] for m in args.modes}
    for rep in range(args.reps):
        rep_cfg = cfg.replace(seed=args.seed + rep)
        for mode in rates:
            model = copy.deepcopy(base)
            plan = plan_for(mode, model, train, rep_cfg, collate)
            r = fit(model, plan, Task(train, lm_loss), QUIET)
            rates[mode].append(r.examples_seen / r.wall_time_s)
            row = out.setdefault(mode, {})
            pad = max(lengths) + 1 if mode == "pad_longest" else None
            row["padded_tokens_per_epoch"] = padded_tokens(plan.batches(0), [n + 1 for n in lengths], pad)
            row.setdefault("val_loss", []).append(mean_loss(model, val_batches, lm_loss, torch.device("cpu")))
            print(
                f"instruct rep {rep + 1} {mode}: {rates[mode][-1]:.2f} examples/s, val loss {row['val_loss'][-1]:.4f}",
                flush=True,
            )
    speedups(out, rates)
    return out


def speedups(out: dict, rates: dict[str, list[float]]) -> None:
    """Medians, and each mode's examples/s over pad_longest's and over shuffled's."""
    for mode in rates:
        out[mode]["examples_per_s_median"] = statistics.median(rates[mode])
        out[mode]["examples_per_s_all"] = rates[mode]
        for name in [k for k in out[mode] if isinstance(out[mode][k], list) and not k.endswith("_all")]:
            out[mode][f"{name}_mean"] = statistics.mean(out[mode][name])  # over the repetitions' seeds
    for ref in ("pad_longest", "shuffled", "pad_longest+dense_embedding"):
        if ref in rates:
            for mode in rates:
                out[mode][f"speedup_vs_{ref}"] = out[mode]["examples_per_s_median"] / out[ref]["examples_per_s_median"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-mini")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--trainable", default="all", help="head | last_blocks (1 block, the book's) | all")
    p.add_argument(
        "--batch-size", type=int, default=16, help="16 = finetune_spam.batch_size in params.yaml (the book: 8)"
    )
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=256, help="truncation of the SMS texts (none below 256)")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["pad_longest", "shuffled", "bucketed"],
        choices=typing.get_args(Batching),
        help="batching settings to compare (as finetune_spam.batching)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--instruct-examples", type=int, default=160, help="0 = skip the instruction comparison")
    p.add_argument("--instruct-max-length", type=int, default=256)
    p.add_argument(
        "--dense-embedding-too",
        action="store_true",
        help="also run each classifier mode with dense AdamW on the token embedding (the old path)",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    keep_freed_memory()  # as the finetune stages run (gptpkg.runner.run_stage)
    mirror = Path(os.environ.get("GPTPKG_DATA_MIRROR", "../shared/data"))
    tok = get_tokenizer(str(mirror))
    result = {"spam": spam(args, mirror, tok)}
    if args.instruct_examples:
        result["instruct"] = instruct(args, mirror, tok)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

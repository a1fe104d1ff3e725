"""The `finetune_spam` stage: the pretrained GPT fine-tuned into the spam classifier.

The recipe: `soup` fine-tunings of the start model (seeds seed, seed+1, ...) are
averaged into one classifier (a uniform model soup), and a spam-logit offset then makes
it decide for `decision_spam_share` spam (Bayes' rule). `cv_folds` adds a k-fold
cross-validation on the training messages, for choosing hyperparameters without
touching the validation or test split.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, SpamConfig
from ..data import SPAM_LABELS, ClassificationDataset, classification_collate, stratified_group_folds
from ..distributed import is_main_process
from ..files import write_json
from ..finetune import finetune_plan, initial_model, set_trainable
from ..loggers import NullLogger
from ..lora import adapter_of, average_adapters
from ..metrics import at_spam_share, classification_metrics
from ..model import GPTClassifier
from ..prepared import heldout_full_rows, read_spam_split, spam_train_rows, text_key, traffic_metrics
from ..tokenizer import PAD_ID, get_tokenizer
from ..train import (
    FitResult,
    Progress,
    RunContext,
    RunPlan,
    Task,
    autocast,
    batches_of,
    classification_loss,
    fit,
    mean_loss,
    save,
    set_seed,
)

# The classifier's spam probability per message: val and test (the final model), and the
# CV's held-out predictions of the training messages (empty with cv_folds 0).
PREDICTIONS_FILE = "finetune_spam_predictions.json"


@torch.no_grad()
def predict_proba(
    model: GPTClassifier,
    dataset,
    batch_size: int = 32,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Spam probability of each item, in order."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out: list[float] = []
    for batch in batches_of(dataset, classification_collate, batch_size):
        with autocast(device, dtype):
            logits = model(batch["input_ids"].to(device), batch["lengths"].to(device))
        out += torch.softmax(logits.float(), dim=-1)[:, 1].tolist()
    model.train(was)
    return out


def decision_offset(labels: list[int], class_weights: list[float] | None, spam_share: float) -> float:
    """The spam-logit shift that makes a classifier trained on `labels` (ham 0, spam 1)
    with `class_weights` decide for traffic with `spam_share` spam.

    Cross-entropy makes the model's odds those of the mix it was trained on: the spam
    share of `labels`, each class counted by its weight (all messages, ~9.5% spam, with
    weights [1, 3]: ~24%). Bayes' rule moves them to another mix by adding
    logit(spam_share) - logit(trained share) to the spam logit; at 0.5 that is the
    decision that maximises the mean of ham and spam recall if the odds are calibrated."""
    w = class_weights or [1.0, 1.0]
    spam = w[1] * sum(1 for y in labels if y == 1)
    ham = w[0] * sum(1 for y in labels if y == 0)
    if not spam or not ham:
        raise ValueError(
            f"decision_offset: need both classes with a positive weight, got {spam:g} weighted spam "
            f"and {ham:g} weighted ham"
        )
    return math.log(spam_share / (1.0 - spam_share)) - math.log(spam / ham)


@torch.no_grad()
def average_weights(target: torch.nn.Module, members: list[torch.nn.Module]) -> None:
    """Load into `target` the mean of `members`' weights (a uniform model soup: the
    members are fine-tunings of one start model, so their weights average into one
    model of the same shape). Non-float entries (none in a GPT) come from the first."""
    states = [m.state_dict() for m in members]
    mean = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    target.load_state_dict(mean)


def soup_seeds(seed: int, n: int) -> list[int]:
    """The fine-tuning seeds of an n-member soup: member i trains with seed + i."""
    return [seed + i for i in range(n)]


def soup_workdir(checkpoint_dir: str | Path) -> Path:
    """Where a soup's members keep their resumable checkpoints until the averaged
    classifier is written: beside the output folder, removed afterwards."""
    p = Path(checkpoint_dir)
    return p.with_name(p.name + ".soup")


def spam_plan(cfg: SpamConfig, model: GPTClassifier, dataset: ClassificationDataset) -> RunPlan:
    """The run plan of one fine-tuning of `model` on `dataset`."""
    return finetune_plan(cfg, model, dataset, classification_collate)


def spam_task(dataset: ClassificationDataset, cfg: SpamConfig, **kw) -> Task:
    """A fine-tuning on `dataset` with the section's class-weighted loss; `kw`: the other
    `Task` fields."""
    return Task(dataset, classification_loss(cfg.class_weights), desc="finetune_spam", **kw)


def train_classifier(model: GPTClassifier, plan: RunPlan, task: Task, ctx: RunContext | None) -> FitResult:
    """The one training setup, for the final classifier and every CV fold: `cfg.soup`
    fine-tunings of copies of `model` through `fit` (`plan`: the first's, `plan.cfg` the
    SpamConfig; `task.train_set` a ClassificationDataset), averaged into `model`, then the
    decision offset (which training never sees; the checkpoint holds it). Only the first
    member evaluates and logs: its curve is the stage's history."""
    cfg = plan.cfg  # the SpamConfig the plan was made from
    share = cfg.decision_spam_share
    offset = None if share is None else [0.0, decision_offset(task.train_set.labels, cfg.class_weights, share)]
    if cfg.soup == 1:
        return fit(model, plan, dataclasses.replace(task, finalize=lambda m: m.set_logit_offset(offset)), ctx)
    work = soup_workdir(task.checkpoint_dir) if task.checkpoint_dir is not None else None
    quiet = None if ctx is None else dataclasses.replace(ctx, logger=NullLogger())
    start, members, results = copy.deepcopy(model), [], []
    for i, seed in enumerate(soup_seeds(cfg.seed, cfg.soup)):
        member = model if i == 0 else copy.deepcopy(start)
        member_task = dataclasses.replace(
            task,
            eval_fn=task.eval_fn if i == 0 else None,
            finalize=None,
            checkpoint_dir=None if work is None else work / f"member-{i + 1}",
            desc=f"{task.desc} soup {i + 1}/{cfg.soup}",
        )
        member_plan = plan if i == 0 else spam_plan(cfg.replace(seed=seed), member, task.train_set)
        results.append(fit(member, member_plan, member_task, ctx if i == 0 else quiet))
        members.append(member)
    if adapter_of(model):  # one adapter of rank soup * r: exactly the mean of the members' updates
        average_adapters(model, members)
    else:
        average_weights(model, members)  # reads every member (model included) before writing model
    del members
    model.set_logit_offset(offset)
    save(model, plan, task, Progress(step=results[0].steps), soup=soup_seeds(cfg.seed, cfg.soup))
    if work is not None and plan.dist.is_main:
        shutil.rmtree(work, ignore_errors=True)
    wall, tokens = sum(r.wall_time_s for r in results), sum(r.tokens_seen for r in results)
    # steps: the schedule of each member (as in the history); the rest: all members
    return FitResult(
        steps=results[0].steps,
        tokens_seen=tokens,
        examples_seen=sum(r.examples_seen for r in results),
        wall_time_s=wall,
        tokens_per_s=tokens / max(wall, 1e-9),
        history=results[0].history,
        compiled=results[0].compiled,
    )


def cross_validate(
    init: GPTClassifier,
    dataset: ClassificationDataset,
    texts: list[str],
    k: int,
    seed: int,
    train_fn: Callable[[GPTClassifier, ClassificationDataset], Any],
    predict_fn: Callable[[GPTClassifier, ClassificationDataset], list[float]],
) -> tuple[dict, dict[int, float]]:
    """k-fold cross-validation on `dataset` (the training messages, `texts` their texts):
    per fold, a copy of `init` is trained by `train_fn` on the other folds and predicts
    the held-out fold. The pooled held-out predictions give the cv_* metrics, with the
    balanced accuracy (the mean of ham and spam recall: the accuracy at 50% spam, the
    book's test mix). Folds are stratified by label and keep identical texts together
    (`stratified_group_folds`, seeded by `seed`). Returns (cv_* metrics, {message index:
    its held-out spam probability})."""
    folds = stratified_group_folds(dataset.labels, [text_key(t) for t in texts], k, seed)
    prob: dict[int, float] = {}
    for i, held in enumerate(folds):
        held_set = set(held)
        model = copy.deepcopy(init)
        train_fn(model, dataset.subset([j for j in range(len(dataset)) if j not in held_set]))
        prob.update(zip(held, predict_fn(model, dataset.subset(held))))
        print(
            f"finetune_spam: cv fold {i + 1}/{k} trained on {len(dataset) - len(held)}, "
            f"predicted {len(held)} held-out messages",
            flush=True,
        )
    order = sorted(prob)
    out = classification_metrics([dataset.labels[i] for i in order], [int(prob[i] > 0.5) for i in order], "cv_")
    out["cv_balanced_accuracy"] = at_spam_share(out["cv_confusion"], 0.5)["accuracy"]
    out["cv_folds"] = k
    return out, prob


def check_cv_folds(k: int, rows: Sequence[tuple[str, int]]) -> None:
    """Before any training: a fold needs a distinct text of each class."""
    distinct = [len({text_key(t) for t, y in rows if y == label}) for label in range(len(SPAM_LABELS))]
    if k > min(distinct):
        raise ConfigError(
            f"params.finetune_spam.cv_folds={k}: expected at most {min(distinct)} folds: the "
            f"{len(rows)} training messages hold "
            + " and ".join(f"{n} distinct {name}" for n, name in zip(distinct, SPAM_LABELS))
            + " texts"
        )


def prediction_rows(rows: Sequence[tuple[str, int]], probs: Sequence[float]) -> list[dict[str, Any]]:
    return [{"text": t, "label": y, "spam_probability": p} for (t, y), p in zip(rows, probs, strict=True)]


def run(cfg: SpamConfig, ctx) -> dict[str, Any]:
    paths = ctx.paths
    set_seed(cfg.seed)
    model = GPTClassifier(initial_model(cfg, "finetune_spam", paths), len(SPAM_LABELS))
    set_trainable(model, cfg, "finetune_spam", paths)
    tok = get_tokenizer(ctx.mirror)
    rows = {p: read_spam_split(paths, p) for p in ("val", "test")}
    rows["train"] = spam_train_rows(paths, cfg.train_data)
    rows["heldout_full"] = heldout_full_rows(paths, rows["train"])
    if cfg.cv_folds:
        check_cv_folds(cfg.cv_folds, rows["train"])
    sets = {p: ClassificationDataset(r, tok, cfg.max_length) for p, r in rows.items()}
    plan = spam_plan(cfg, model, sets["train"])
    device, dtype = plan.device, plan.dtype
    model.to(device)
    init = copy.deepcopy(model) if cfg.cv_folds else None  # every CV fold starts from this
    loss_fn = classification_loss(cfg.class_weights)
    val_batches = batches_of(sets["val"], classification_collate, cfg.batch_size)
    predict = partial(predict_proba, batch_size=cfg.batch_size, device=device, dtype=dtype)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        labels = [int(p > 0.5) for p in predict(m, sets["val"])]
        return {
            "val_loss": mean_loss(m, val_batches, loss_fn, device, 0, dtype),
            "val_accuracy": classification_metrics(sets["val"].labels, labels)["accuracy"],
        }

    meta = {
        "stage": "finetune_spam",
        "labels": list(SPAM_LABELS),
        "max_length": cfg.max_length,
        "pad_id": PAD_ID,
        "decision_spam_share": cfg.decision_spam_share,
    }
    task = spam_task(sets["train"], cfg, eval_fn=evaluate, checkpoint_dir=paths.spam_classifier, meta=meta)
    result = train_classifier(model, plan, task, ctx)
    metrics: dict[str, Any] = {
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "examples_per_s": result.examples_seen / max(result.wall_time_s, 1e-9),
        "compiled": result.compiled,
        "n_trainable_params": model.num_params(trainable_only=True),
        "train_messages": len(rows["train"]),
        "heldout_full_messages": len(rows["heldout_full"]),
    }
    probs = {part: predict(model, ds) for part, ds in sets.items()}
    for part, ds in sets.items():
        metrics.update(classification_metrics(ds.labels, [int(p > 0.5) for p in probs[part]], f"{part}_"))
    metrics.update(traffic_metrics(paths, metrics))
    cv_probs: dict[int, float] = {}
    if cfg.cv_folds:
        t0 = time.perf_counter()
        quiet = dataclasses.replace(ctx, logger=NullLogger(), resume=False)  # no checkpoints either
        cv_metrics, cv_probs = cross_validate(
            init,
            sets["train"],
            [t for t, _ in rows["train"]],
            cfg.cv_folds,
            cfg.seed,
            lambda m, ds: train_classifier(m, spam_plan(cfg, m, ds), spam_task(ds, cfg), quiet),
            predict,
        )
        metrics.update(cv_metrics, cv_wall_time_s=time.perf_counter() - t0)
    if is_main_process():
        write_json(
            Path(paths.metrics) / PREDICTIONS_FILE,
            {
                "decision": "spam iff spam_probability > 0.5 (decision_spam_share's offset included)",
                "val": prediction_rows(rows["val"], probs["val"]),
                "test": prediction_rows(rows["test"], probs["test"]),
                "cv_folds": cfg.cv_folds,
                "cv_seed": cfg.seed,
                "cv": prediction_rows(
                    [rows["train"][i] for i in sorted(cv_probs)], [cv_probs[i] for i in sorted(cv_probs)]
                ),
            },
            indent=0,
        )
    metrics["history"] = result.history
    return metrics

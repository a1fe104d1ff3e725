"""The `finetune_spam` and `finetune_instruct` stages (both through `train.fit`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checkpoint import (
    atomic_write_text, check_same_training, load_checkpoint, load_trainer_state, read_config, save_checkpoint,
)
from .config import POOLINGS, ConfigError, model_config
from .data import (
    SPAM_LABELS, ClassificationDataset, InstructionDataset, classification_collate,
    format_prompt, instruction_collate, stratified_group_folds,
)
from .distributed import barrier, env_context, is_main_process
from .generate import generate_text
from .loggers import MetricLogger
from .metrics import at_spam_share, classification_metrics
from .model import GPT
from .stages import (
    InstructConfig, PrepareConfig, SpamConfig, contains_any, heldout_full_rows, mirror_of, paths_of, read_spam_split,
    spam_train_rows, stage_config, text_key, traffic_metrics, training_params,
)
from .tokenizer import DEFAULT_TOKENIZER, FRAMINGS, PAD_ID, check_tokenizer, get_tokenizer, tokenizer_of
from .train import (
    BATCHING, TIMING_KEYS, FitResult, autocast, autocast_dtype, batch_plan_for, batches_of, classification_loss, fit,
    lm_loss, mean_loss, resolve_device, set_seed,
)


def initial_model(init: str, params_section: str, pretrained: str, openai_weights: str,
                  preset: str | None = None, drop_rate: float | None = None) -> GPT:
    """The model a fine-tuning starts from: our pretrained checkpoint, local OpenAI
    GPT-2 weights, or (classifier only) a fresh preset. `drop_rate` (the stage's own
    key) sets its dropout; None keeps the start's: the checkpoint's pretraining
    drop_rate, 0 for OpenAI's weights, the preset's for scratch."""
    if drop_rate is not None and not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"params.{params_section}.drop_rate: expected null (the start model's) or a "
                          f"probability in [0, 1), got {drop_rate!r}")
    if init == "pretrained":
        model, _ = load_checkpoint(pretrained)
    elif init == "openai":
        if not openai_weights:
            raise ConfigError(f"params.{params_section}.openai_weights: set a local folder of GPT-2 weights for init=openai")
        from .hf_weights import load_openai_gpt2

        model = load_openai_gpt2(openai_weights)
    elif init == "scratch" and preset:
        model = GPT(model_config(preset))
    else:
        raise ConfigError(f"params.{params_section}.init: expected pretrained|openai|scratch, got {init!r}")
    if drop_rate is not None:
        model.set_drop_rate(float(drop_rate))
    # A pretraining on its corpus's tokens only (pretrain.lm_vocab: corpus) scored no
    # other token; a fine-tuning's texts may hold any, so it scores them all.
    model.set_lm_vocab(None)
    return model


def start_tokenizer(init: str, params: dict) -> str:
    """The tokenizer of the model a fine-tuning starts from: the one its pretrained
    checkpoint records, GPT-2's own for OpenAI's weights, and prepare's `tokenizer` for a
    model trained from scratch (the one the pretraining corpus would use)."""
    if init == "pretrained":
        where = paths_of(params).pretrained
        return check_tokenizer(tokenizer_of(read_config(where)), f"{where}: meta.tokenizer")
    if init == "scratch":
        return check_tokenizer(stage_config(params, "prepare", PrepareConfig)[0].tokenizer, "params.prepare.tokenizer")
    return DEFAULT_TOKENIZER


def _batching(batching: str, where: str, lengths: list[int], train, collate: Callable):
    """(batch plan, collate) for a `batching` setting. pad_longest pads every example to
    the longest in the training set (the book's classifier; a baseline for instructions)."""
    if batching not in BATCHING:
        raise ConfigError(f"params.{where}.batching: expected {'|'.join(BATCHING)}, got {batching!r}")
    plan = batch_plan_for(batching, lengths, train.batch_size, train.seed)
    if batching == "pad_longest":
        collate = partial(collate, pad_to=max(lengths))
    return plan, collate


# ---------------------------------------------------------------------------------
# Spam classifier


@torch.no_grad()
def predict_proba(model: GPT, dataset, batch_size: int = 32, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> list[float]:
    """Spam probability of each item, in order."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out: list[float] = []
    for batch in batches_of(dataset, classification_collate, batch_size):
        with autocast(device, dtype):
            logits = model.classify(batch["input_ids"].to(device), batch["lengths"].to(device))
        out += torch.softmax(logits.float(), dim=-1)[:, 1].tolist()
    model.train(was)
    return out


def evaluate_classifier(model: GPT, dataset, prefix: str, batch_size: int = 32, **kw) -> dict[str, Any]:
    probs = predict_proba(model, dataset, batch_size, **kw)
    return classification_metrics(dataset.labels, [int(p > 0.5) for p in probs], prefix)


def cross_validate(init: GPT, dataset: ClassificationDataset, texts: list[str], k: int, seed: int,
                   train_fn: Callable[[GPT, ClassificationDataset, str], Any],
                   predict_fn: Callable[[GPT, ClassificationDataset], list[float]],
                   train_only: Sequence[int] = ()) -> tuple[dict[str, Any], dict[int, float]]:
    """k-fold cross-validation on `dataset` (the training messages, `texts` their texts):
    per fold, a copy of `init` (the model a fine-tuning starts from) is trained by
    `train_fn` on the other folds and predicts the held-out fold. The held-out
    predictions are pooled into cv_* metrics: accuracy, spam precision/recall/F1, the
    confusion matrix, and the balanced accuracy (the mean of ham and spam recall: the
    accuracy at 50% spam, the book's balanced test mix). Folds are stratified by label
    and keep identical texts together (`stratified_group_folds`, seeded by `seed`).

    `train_only`: indices of messages every fold trains on and none holds out (with
    train_data=nontest, the validation messages): the folds, and so the figures, are
    those of the other messages alone, the same as without them. A train-only text
    identical to a folded one is an error (it would be trained on while held out).

    Returns (the cv_* metrics, {message index: its held-out spam probability}): the
    probabilities let runs on the same folds be compared or averaged message by message."""
    fixed = set(train_only)
    folded = [i for i in range(len(dataset)) if i not in fixed]
    fixed_keys = {text_key(texts[i]) for i in fixed}
    clash = [texts[i] for i in folded if text_key(texts[i]) in fixed_keys]
    if clash:
        raise ValueError(f"cross_validate: {len(clash)} cross-validated message(s) share a text with a train-only "
                         f"message (e.g. {clash[0][:60]!r}); they would be trained on while held out")
    folds = [[folded[j] for j in fold] for fold in stratified_group_folds(
        [dataset.labels[i] for i in folded], [text_key(texts[i]) for i in folded], k, seed)]
    prob: dict[int, float] = {}
    for i, held in enumerate(folds):
        held_set = set(held)
        model = copy.deepcopy(init)
        train_fn(model, dataset.subset([j for j in range(len(dataset)) if j not in held_set]), f"cv fold {i + 1}/{k}")
        for j, p in zip(held, predict_fn(model, dataset.subset(held))):
            prob[j] = p
        del model
        print(f"finetune_spam: cv fold {i + 1}/{k} trained on {len(dataset) - len(held)}, "
              f"predicted {len(held)} held-out messages", flush=True)
    assert sorted(prob) == folded, "the folds must cover every cross-validated message"
    out = classification_metrics([dataset.labels[i] for i in folded], [int(prob[i] > 0.5) for i in folded], "cv_")
    out["cv_balanced_accuracy"] = at_spam_share(out["cv_confusion"], 0.5)["accuracy"]
    out["cv_folds"] = k
    if fixed:
        out["cv_train_only_messages"] = len(fixed)
    return out, prob


def check_cv_folds(value: int) -> None:
    if value != 0 and value < 2:
        raise ConfigError(f"params.finetune_spam.cv_folds: expected 0 (off) or an integer >= 2 "
                          f"(the number of folds), got {value!r}")


def check_decision_spam_share(value: float | None) -> None:
    if value is not None and not 0.0 < value < 1.0:  # its type: checked by stage_config
        raise ConfigError(f"params.finetune_spam.decision_spam_share: expected null (decide as trained) or a "
                          f"spam share strictly between 0 and 1 (0.5: the book's balanced test mix), got {value!r}")


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
        raise ValueError(f"decision_offset: need both classes with a positive weight, got {spam:g} weighted spam "
                         f"and {ham:g} weighted ham")
    return math.log(spam_share / (1.0 - spam_share)) - math.log(spam / ham)


def check_soup(value: int) -> None:
    if value < 1:
        raise ConfigError(f"params.finetune_spam.soup: expected an integer >= 1 (the number of fine-tunings "
                          f"averaged into the classifier; 1 = one fine-tuning), got {value!r}")


@torch.no_grad()
def average_weights(target: torch.nn.Module, members: list[torch.nn.Module]) -> None:
    """Load into `target` the mean of `members`' weights (a uniform model soup: the
    members are fine-tunings of one start model, so their weights average into one
    model of the same shape). Non-float entries (none in a GPT) come from the first."""
    states = [m.state_dict() for m in members]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}
    target.load_state_dict(mean)


def soup_seeds(seed: int, n: int) -> list[int]:
    """The fine-tuning seeds of an n-member soup: member i trains with seed + i."""
    return [seed + i for i in range(n)]


def soup_workdir(checkpoint_dir: str | Path) -> Path:
    """Where a soup's members keep their checkpoints (for --resume) until the averaged
    classifier is written: beside the output folder, removed afterwards."""
    p = Path(checkpoint_dir)
    return p.with_name(p.name + ".soup")


def run_spam(params: dict, logger: MetricLogger, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    paths = paths_of(params)
    cfg, train = stage_config(params, "finetune_spam", SpamConfig)
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"params.finetune_spam.pooling: expected one of {'|'.join(POOLINGS)}, got {cfg.pooling!r}")
    if cfg.framing not in FRAMINGS:
        raise ConfigError(f"params.finetune_spam.framing: expected one of {'|'.join(FRAMINGS)}, got {cfg.framing!r}")
    if cfg.framing == "eot" and cfg.max_length < 3:
        raise ConfigError(f"params.finetune_spam.max_length={cfg.max_length}: framing eot needs at least 3 "
                          f"(two <|endoftext|> and one token of the message)")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"params.finetune_spam.label_smoothing: expected a share in [0, 1) (0 = off), "
                          f"got {cfg.label_smoothing!r}")
    check_cv_folds(cfg.cv_folds)
    check_soup(cfg.soup)
    check_decision_spam_share(cfg.decision_spam_share)
    set_seed(train.seed)
    model = initial_model(cfg.init, "finetune_spam", paths.pretrained, cfg.openai_weights, cfg.model, cfg.drop_rate)
    if cfg.max_length > model.cfg.context_length:
        raise ConfigError(f"params.finetune_spam.max_length={cfg.max_length} exceeds the model's "
                          f"context_length {model.cfg.context_length}")
    model.to_classifier(len(SPAM_LABELS), cfg.pooling)
    model.set_trainable(cfg.trainable, cfg.n_blocks)
    if cfg.freeze_embeddings:
        model.tok_emb.weight.requires_grad_(False)
    tok = get_tokenizer(mirror_of(params), start_tokenizer(cfg.init, params))
    rows = {p: read_spam_split(paths, p) for p in ("val", "test")}
    rows["train"] = spam_train_rows(paths, cfg.train_data, "params.finetune_spam")
    rows["heldout_full"] = heldout_full_rows(paths, rows["train"])
    # With train_data=nontest the CV folds over the messages holding no validation text
    # (the `all` messages: the same folds and figures as train_data=all), and the
    # validation messages train in every fold (`cross_validate`'s train_only).
    val_keys = {text_key(t) for t, _ in rows["val"]} if cfg.train_data == "nontest" else set()
    in_val = [bool(val_keys) and contains_any(t, val_keys) for t, _ in rows["train"]]
    train_only = [i for i, v in enumerate(in_val) if v]
    folded = [r for r, v in zip(rows["train"], in_val) if not v]
    if cfg.cv_folds:  # before any training: more folds than distinct texts of a class
        distinct = [len({text_key(t) for t, y in folded if y == label}) for label in range(len(SPAM_LABELS))]
        if cfg.cv_folds > min(distinct):
            raise ConfigError(
                f"params.finetune_spam.cv_folds={cfg.cv_folds}: expected at most {min(distinct)} folds: the "
                f"{len(folded)} cross-validated training messages hold "
                + " and ".join(f"{n} distinct {name}" for n, name in zip(distinct, SPAM_LABELS))
                + " texts (a fold needs one of each)")
    sets = {p: ClassificationDataset(r, tok, cfg.max_length, cfg.framing) for p, r in rows.items()}
    device = resolve_device(train.device)
    dtype = autocast_dtype(train.precision, device)
    model.to(device)
    init = copy.deepcopy(model) if cfg.cv_folds else None  # every CV fold starts from this
    loss_fn = classification_loss(cfg.class_weights, cfg.label_smoothing)
    val_batches = batches_of(sets["val"], classification_collate, train.batch_size)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        acc = evaluate_classifier(m, sets["val"], "val_", train.batch_size, device=device, dtype=dtype)
        return {"val_loss": mean_loss(m, val_batches, loss_fn, device, 0, dtype),
                "val_accuracy": acc["val_accuracy"]}

    def fine_tune(m: GPT, dataset: ClassificationDataset, tc, desc: str, **fit_kw):
        lengths = [len(ids) for ids in dataset.ids]
        plan, collate = _batching(cfg.batching, "finetune_spam", lengths, tc, classification_collate)
        return fit(m, dataset, collate, tc, loss_fn=loss_fn, batch_plan=plan, progress=progress, desc=desc, **fit_kw)

    def decide(m: GPT, dataset: ClassificationDataset) -> None:
        """After training on `dataset`: the decision rule of `decision_spam_share`."""
        share = cfg.decision_spam_share
        m.set_logit_offset(None if share is None else [0.0, decision_offset(dataset.labels, cfg.class_weights, share)])

    def train_classifier(m: GPT, dataset: ClassificationDataset, desc: str, checkpoint_dir=None, resume=False,
                         meta=None, **fit_kw):
        """The one training setup: the final model and every CV fold go through it.
        With soup = n > 1: n fine-tunings of copies of `m` (seeds seed, seed+1, ...),
        then `m` becomes their weight average. Only the first member gets the eval and
        the logger (its curve is the stage's history); each member checkpoints into
        `soup_workdir(checkpoint_dir)` for --resume, removed once the soup is written.
        Then `decide`: training never sees the logit offset, the checkpoint holds it."""
        if cfg.soup == 1:  # the final checkpoint is written with the offset
            return fine_tune(m, dataset, train, desc, checkpoint_dir=checkpoint_dir, resume=resume, meta=meta,
                             finalize=lambda trained: decide(trained, dataset), **fit_kw)
        work = soup_workdir(checkpoint_dir) if checkpoint_dir is not None else None
        done = load_trainer_state(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
        if done is not None and "soup" in done:  # --resume of a finished soup: nothing to train
            # (the runner has checked that it was trained with these params, soup included)
            saved, _ = load_checkpoint(checkpoint_dir, map_location=m.tok_emb.weight.device)
            m.load_state_dict(saved.state_dict())
            decide(m, dataset)  # decision_spam_share acts after training: it may have changed
            if m.logit_offset != saved.logit_offset and is_main_process():
                save_checkpoint(checkpoint_dir, m, meta=read_config(checkpoint_dir)["meta"], trainer_state=done)
            barrier(env_context())
            r = done["soup"]
            return FitResult(steps=r["steps"], tokens_seen=r["tokens_seen"], examples_seen=r["examples_seen"],
                             wall_time_s=0.0, tokens_per_s=0.0, history=list(r["history"]))
        start, members, results = copy.deepcopy(m), [], []
        for i, seed in enumerate(soup_seeds(train.seed, cfg.soup)):
            tc = dataclasses.replace(train, seed=seed)
            member_dir = None if work is None else work / f"member-{i + 1}"
            if resume and member_dir is not None:
                check_same_training(member_dir, dataclasses.asdict(tc), "params.finetune_spam",
                                    training_params(cfg))
            member = m if i == 0 else copy.deepcopy(start)
            results.append(fine_tune(member, dataset, tc, f"{desc} soup {i + 1}/{cfg.soup}", checkpoint_dir=member_dir,
                                     resume=resume, meta=meta, **(fit_kw if i == 0 else {})))
            members.append(member)
        average_weights(m, members)  # reads every member (m included) before writing m
        del members
        decide(m, dataset)
        if checkpoint_dir is not None:
            if is_main_process():
                # The trainer state of a finished soup: what --resume returns without training
                # (timings left out, so the same params give byte-identical files).
                summary = {"steps": results[0].steps, "tokens_seen": sum(r.tokens_seen for r in results),
                           "examples_seen": sum(r.examples_seen for r in results),
                           "history": [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                                       for row in results[0].history]}
                save_checkpoint(checkpoint_dir, m, meta={
                    **(meta or {}), "step": results[0].steps, "train": dataclasses.asdict(train),
                    "soup": {"members": cfg.soup, "seeds": soup_seeds(train.seed, cfg.soup)}},
                    trainer_state={"soup": summary})
                shutil.rmtree(work, ignore_errors=True)
            barrier(env_context())
        wall = sum(r.wall_time_s for r in results)
        # steps: the schedule of each member (as in the history); the rest: all members
        return FitResult(steps=results[0].steps, tokens_seen=sum(r.tokens_seen for r in results),
                         examples_seen=sum(r.examples_seen for r in results), wall_time_s=wall,
                         tokens_per_s=sum(r.tokens_seen for r in results) / max(wall, 1e-9),
                         history=results[0].history)

    meta = {"stage": "finetune_spam", "train_data": cfg.train_data, "labels": list(SPAM_LABELS), "max_length": cfg.max_length,
            "pad_id": PAD_ID, "pooling": cfg.pooling, "framing": cfg.framing, "tokenizer": tok.name, "decision_spam_share": cfg.decision_spam_share,
            "stage_params": training_params(cfg)}
    result = train_classifier(model, sets["train"], "finetune_spam", eval_fn=evaluate,
                              checkpoint_dir=paths.spam_classifier, resume=resume, logger=logger, meta=meta)
    metrics: dict[str, Any] = {"steps": result.steps, "wall_time_s": result.wall_time_s,
                               "examples_per_s": result.examples_seen / max(result.wall_time_s, 1e-9),
                               "n_trainable_params": model.num_params(trainable_only=True),
                               "train_messages": len(rows["train"]), "heldout_full_messages": len(rows["heldout_full"])}
    probs = {part: predict_proba(model, ds, train.batch_size, device=device, dtype=dtype) for part, ds in sets.items()}
    for part, ds in sets.items():
        metrics.update(classification_metrics(ds.labels, [int(p > 0.5) for p in probs[part]], f"{part}_"))
    metrics.update(traffic_metrics(paths, metrics))
    cv_probs: dict[int, float] = {}
    if cfg.cv_folds:
        t0 = time.perf_counter()
        cv_metrics, cv_probs = cross_validate(
            init, sets["train"], [t for t, _ in rows["train"]], cfg.cv_folds, train.seed,
            train_fn=train_classifier,
            predict_fn=lambda m, ds: predict_proba(m, ds, train.batch_size, device=device, dtype=dtype),
            train_only=train_only)
        metrics.update(cv_metrics)
        metrics["cv_wall_time_s"] = time.perf_counter() - t0
    predictions = {
        "decision": "spam iff spam_probability > 0.5 (decision_spam_share's offset included)",
        "val": prediction_rows(rows["val"], probs["val"]),
        "test": prediction_rows(rows["test"], probs["test"]),
        "cv_folds": cfg.cv_folds, "cv_seed": train.seed,
        "cv": prediction_rows([rows["train"][i] for i in sorted(cv_probs)], [cv_probs[i] for i in sorted(cv_probs)]),
    }
    if is_main_process():
        atomic_write_text(Path(paths.metrics) / PREDICTIONS_FILE,
                          json.dumps(predictions, indent=0, ensure_ascii=False) + "\n")
    metrics["history"] = result.history
    return metrics


# The classifier's spam probability per message: val and test (the final model), and the
# CV's held-out predictions of the training messages (empty with cv_folds 0). Runs with
# the same finetune_spam.seed and training messages share their folds, so their files
# can be compared or averaged message by message (bench/classifier_experiments.py ensemble).
PREDICTIONS_FILE = "finetune_spam_predictions.json"


def prediction_rows(rows: Sequence[tuple[str, int]], probs: Sequence[float]) -> list[dict[str, Any]]:
    if len(rows) != len(probs):
        raise ValueError(f"prediction_rows: {len(rows)} messages but {len(probs)} probabilities")
    return [{"text": t, "label": y, "spam_probability": p} for (t, y), p in zip(rows, probs)]


# ---------------------------------------------------------------------------------
# Instruction fine-tuning


def run_instruct(params: dict, logger: MetricLogger, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    paths = paths_of(params)
    cfg, train = stage_config(params, "finetune_instruct", InstructConfig)
    set_seed(train.seed)
    model = initial_model(cfg.init, "finetune_instruct", paths.pretrained, cfg.openai_weights,
                          drop_rate=cfg.drop_rate)
    if cfg.max_length > model.cfg.context_length:
        raise ConfigError(f"params.finetune_instruct.max_length={cfg.max_length} exceeds the model's "
                          f"context_length {model.cfg.context_length}")
    tok = get_tokenizer(mirror_of(params), start_tokenizer(cfg.init, params))
    splits = {p: json.loads((Path(paths.processed) / "instruct" / f"{p}.json").read_text(encoding="utf-8"))
              for p in ("train", "val", "test")}
    sets = {p: InstructionDataset(rows, tok) for p, rows in splits.items()}
    collate = partial(instruction_collate, allowed_max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)
    device = resolve_device(train.device)
    dtype = autocast_dtype(train.precision, device)
    model.to(device)
    eval_sets = {p: batches_of(sets[p], collate, train.batch_size) for p in ("train", "val", "test")}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": mean_loss(m, eval_sets["val"], lm_loss, device, train.eval_batches, dtype)}

    lengths = [len(it["input_ids"]) for it in sets["train"].items]
    plan, train_collate = _batching(cfg.batching, "finetune_instruct", lengths, train, collate)
    result = fit(model, sets["train"], train_collate, train, loss_fn=lm_loss, eval_fn=evaluate, batch_plan=plan,
                 checkpoint_dir=paths.instruct_model, resume=resume, logger=logger,
                 meta={"stage": "finetune_instruct", "tokenizer": tok.name, "stage_params": training_params(cfg)},
                 progress=progress,
                 desc="finetune_instruct")
    # train loss over eval_batches (0 = all) batches: a full pass over the train split costs
    # more than the training itself on CPU; val and test are always complete.
    metrics: dict[str, Any] = {f"{p}_loss": mean_loss(model, b, lm_loss, device, train.eval_batches if p == "train" else 0, dtype)
                               for p, b in eval_sets.items()}
    responses = []
    for entry in splits["test"]:
        prompt = format_prompt(entry) + "\n\n### Response:\n"
        text = generate_text(model, tok, prompt, cfg.max_new_tokens).strip()
        responses.append({**{k: entry.get(k, "") for k in ("instruction", "input", "output")}, "model_response": text})
    metrics.update(judge_responses(responses, cfg))
    out = Path(paths.metrics) / "instruct_responses.json"
    atomic_write_text(out, json.dumps(responses, indent=1, ensure_ascii=False) + "\n")
    logger.log_table("test_responses", ["instruction", "input", "output", "model_response"],
                     [[r["instruction"], r["input"], r["output"], r["model_response"]] for r in responses[:50]])
    metrics.update({"steps": result.steps, "wall_time_s": result.wall_time_s,
                    "tokens_per_s": result.tokens_per_s, "history": result.history,
                    "test_perplexity": math.exp(min(metrics["test_loss"], 50.0))})
    return metrics


def judge_responses(responses: list[dict], cfg: InstructConfig) -> dict[str, Any]:
    """Score each response 0-100 through an OpenAI-compatible chat endpoint (e.g. a
    local Ollama at http://localhost:11434/v1) when `judge_url` is set."""
    if not cfg.judge_url:
        print("finetune_instruct: judge_url not set, skipped judging the responses")
        return {"judge": "skipped"}
    import urllib.request

    scores = []
    for r in responses:
        prompt = (f"Given the input `{format_prompt(r)}` and correct output `{r['output']}`, score the "
                  f"model response `{r['model_response']}` on a scale from 0 to 100, where 100 is the "
                  f"best score. Respond with the integer number only.")
        body = json.dumps({"model": cfg.judge_model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "seed": 123}).encode()
        req = urllib.request.Request(cfg.judge_url.rstrip("/") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            content = json.loads(resp.read())["choices"][0]["message"]["content"]
        try:
            scores.append(max(0, min(100, int(content.strip().split()[0]))))
        except (ValueError, IndexError):
            continue
    return {"judge": cfg.judge_model, "judge_mean_score": sum(scores) / len(scores) if scores else None,
            "judge_scored": len(scores)}

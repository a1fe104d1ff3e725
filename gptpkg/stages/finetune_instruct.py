"""The `finetune_instruct` stage: the pretrained GPT fine-tuned on Alpaca-style
instructions. Its responses to the validation and test instructions are scored offline
(ROUGE-L, exact match: `gptpkg.answers`); the test responses are written beside its
metrics, with their per-item scores as a plot file."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..answers import distinct_share, item_scores, mean_scores
from ..config import InstructConfig
from ..data import InstructionDataset, format_prompt, instruction_collate
from ..files import write_json
from ..finetune import finetune_plan, initial_model, set_trainable
from ..generate import generate_text
from ..plots import write_item_scores
from ..prepared import read_instruct_split
from ..tokenizer import get_tokenizer
from ..train import Task, batches_of, fit, lm_loss, mean_loss, set_seed


def run(cfg: InstructConfig, ctx) -> dict[str, Any]:
    paths = ctx.paths
    set_seed(cfg.seed)
    model = initial_model(cfg, "finetune_instruct", paths)
    set_trainable(model, cfg, "finetune_instruct", paths)
    tok = get_tokenizer(ctx.mirror)
    splits = {p: read_instruct_split(paths, p) for p in ("train", "val", "test")}
    sets = {p: InstructionDataset(rows, tok) for p, rows in splits.items()}
    collate = partial(instruction_collate, allowed_max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)
    plan = finetune_plan(cfg, model, sets["train"], collate)
    device, dtype = plan.device, plan.dtype
    model.to(device)
    eval_sets = {p: batches_of(sets[p], collate, cfg.batch_size) for p in ("train", "val", "test")}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"val_loss": mean_loss(m, eval_sets["val"], lm_loss, device, cfg.eval_batches, dtype)}

    task = Task(
        sets["train"],
        lm_loss,
        evaluate,
        checkpoint_dir=paths.instruct_model,
        meta={"stage": "finetune_instruct"},
        desc="finetune_instruct",
    )
    result = fit(model, plan, task, ctx)
    # train loss over eval_batches (0 = all) batches: a full pass over the train split costs
    # more than the training itself on CPU; val and test are always complete.
    metrics: dict[str, Any] = {
        f"{p}_loss": mean_loss(model, b, lm_loss, device, cfg.eval_batches if p == "train" else 0, dtype)
        for p, b in eval_sets.items()
    }
    for part in ("val", "test"):
        entries = splits[part]
        answers = [answer(model, tok, e, cfg) for e in entries]
        rows = item_scores([e["output"] for e in entries], answers)
        metrics.update(mean_scores(rows, f"{part}_"), **{f"{part}_distinct_answers": distinct_share(answers)})
    responses = [
        {**{k: e.get(k, "") for k in ("instruction", "input", "output")}, "model_response": a, **r}
        for e, a, r in zip(entries, answers, rows)
    ]
    metrics.update(judge_responses(responses, cfg))
    write_json(Path(paths.metrics) / "instruct_responses.json", responses, indent=1)
    write_item_scores(paths.plots, "finetune_instruct", rows)
    columns = ["instruction", "input", "output", "model_response", "rouge_l", "exact_match"]
    ctx.logger.log_table("test_responses", columns, [[r[c] for c in columns] for r in responses])
    metrics.update(
        {
            "steps": result.steps,
            "wall_time_s": result.wall_time_s,
            "tokens_per_s": result.tokens_per_s,
            "compiled": result.compiled,
            "n_trainable_params": model.num_params(trainable_only=True),
            "history": result.history,
            "test_perplexity": math.exp(min(metrics["test_loss"], 50.0)),
        }
    )
    return metrics


def answer(model, tok, entry: dict, cfg: InstructConfig) -> str:
    """The model's response to one instruction record, decoded as `cfg` says."""
    prompt = format_prompt(entry) + "\n\n### Response:\n"
    return generate_text(
        model,
        tok,
        prompt,
        cfg.max_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram=cfg.no_repeat_ngram,
    ).strip()


def judge_responses(responses: list[dict], cfg: InstructConfig) -> dict[str, Any]:
    """Score each response 0-100 through an OpenAI-compatible chat endpoint (e.g. a
    local Ollama at http://localhost:11434/v1) when `judge_url` is set."""
    if not cfg.judge_url:
        print("finetune_instruct: judge_url not set, skipped judging the responses")
        return {"judge": "skipped"}
    import urllib.request

    scores = []
    for r in responses:
        prompt = (
            f"Given the input `{format_prompt(r)}` and correct output `{r['output']}`, score the "
            f"model response `{r['model_response']}` on a scale from 0 to 100, where 100 is the "
            f"best score. Respond with the integer number only."
        )
        body = json.dumps(
            {"model": cfg.judge_model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "seed": 123}
        ).encode()
        req = urllib.request.Request(
            cfg.judge_url.rstrip("/") + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            content = json.loads(resp.read())["choices"][0]["message"]["content"]
        try:
            scores.append(max(0, min(100, int(content.strip().split()[0]))))
        except (ValueError, IndexError):
            continue
    return {
        "judge": cfg.judge_model,
        "judge_mean_score": sum(scores) / len(scores) if scores else None,
        "judge_scored": len(scores),
    }

"""Offline scores of instruction answers, and the `baseline_instruct` stage.

Each answer is scored against the reference `output` with ROUGE-L F1 (Google's
`rouge-score`: lowercase word tokens, no stemming) and exact match (after folding case
and whitespace). The retrieval baseline answers each item with the training output of
the nearest training instruction (TF-IDF over instruction + input, cosine), on exactly
the split the instruction model is scored on, so every report shows whether the model
beats looking the answer up."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import BaselineInstructConfig
from .files import write_json

SCORE_KEYS = ("rouge_l", "exact_match")
# The test answers with their scores, one file per stage, in paths.metrics.
MODEL_RESPONSES = "instruct_responses.json"  # finetune_instruct
BASELINE_RESPONSES = "baseline_instruct_responses.json"  # baseline_instruct


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def item_scores(references: Sequence[str], answers: Sequence[str]) -> list[dict[str, Any]]:
    """One {"item", "rouge_l", "exact_match"} row per (reference, answer) pair."""
    from rouge_score.rouge_scorer import RougeScorer

    if len(references) != len(answers):
        raise ValueError(f"need one answer per reference, got {len(answers)} answers for {len(references)}")
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    return [
        {
            "item": i,
            "rouge_l": scorer.score(ref, ans)["rougeL"].fmeasure,
            "exact_match": int(_fold(ref) == _fold(ans)),
        }
        for i, (ref, ans) in enumerate(zip(references, answers))
    ]


def mean_scores(rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """{prefix + "rouge_l": mean, prefix + "exact_match": share} over `rows`."""
    return {f"{prefix}{k}": sum(r[k] for r in rows) / len(rows) for k in SCORE_KEYS}


def query_text(entry: dict) -> str:
    """What the retrieval baseline matches on: the instruction and its input."""
    return f"{entry['instruction']}\n{entry.get('input', '')}"


def nearest_outputs(train: list[dict], queries: list[dict], cfg: BaselineInstructConfig) -> list[str]:
    """For each query, the output of the training record whose instruction + input is
    closest by TF-IDF cosine (the first one on ties)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import linear_kernel

    vec = TfidfVectorizer(max_features=cfg.max_features or None, ngram_range=(1, cfg.ngram_max))
    X = vec.fit_transform([query_text(e) for e in train])  # rows are L2-normalized: dot = cosine
    best = linear_kernel(vec.transform([query_text(e) for e in queries]), X).argmax(axis=1)
    return [train[int(j)]["output"] for j in best]


def run(cfg: BaselineInstructConfig, ctx) -> dict[str, Any]:
    from .plots import write_item_scores
    from .prepare import read_instruct_split

    paths = ctx.paths
    t0 = time.perf_counter()
    train = read_instruct_split(paths, "train")
    metrics: dict[str, Any] = {}
    for part in ("val", "test"):
        entries = read_instruct_split(paths, part)
        answers = nearest_outputs(train, entries, cfg)
        rows = item_scores([e["output"] for e in entries], answers)
        metrics.update(mean_scores(rows, f"{part}_"))
    responses = [
        {**{k: e.get(k, "") for k in ("instruction", "input", "output")}, "baseline_response": a, **r}
        for e, a, r in zip(entries, answers, rows)
    ]
    write_json(Path(paths.metrics) / BASELINE_RESPONSES, responses, indent=1)
    write_item_scores(paths.plots, "baseline_instruct", rows)
    metrics.update(train_records=len(train), wall_time_s=time.perf_counter() - t0)
    return metrics


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|") or " "


def sample_table(model_rows: list[dict], baseline_rows: list[dict] | None, n: int = 10) -> str:
    """The first `n` test items as a markdown table: instruction (+ input), reference, the
    model's answer and ROUGE-L, and the baseline's answer and ROUGE-L where the baseline
    answered the same item (matched on instruction + input)."""
    base = {query_text(r): r for r in baseline_rows or []}
    lines = [
        "| instruction | reference | model | ROUGE-L | baseline | ROUGE-L |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for r in model_rows[:n]:
        b = base.get(query_text(r))
        b_answer, b_score = (_cell(b["baseline_response"]), f"{b['rouge_l']:.2f}") if b else ("—", "—")
        lines.append(
            f"| {_cell(query_text(r).strip())} | {_cell(r['output'])} | {_cell(r['model_response'])} "
            f"| {r['rouge_l']:.2f} | {b_answer} | {b_score} |"
        )
    return "\n".join(lines)

"""Offline scores of instruction answers.

Each answer is scored against the reference `output` with ROUGE-L F1 (Google's
`rouge-score`: lowercase word tokens, no stemming) and exact match (after folding case
and whitespace). The model (`finetune_instruct`) and the retrieval baseline
(`baseline_instruct`) are scored by the same functions on the same split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def distinct_share(answers: Sequence[str]) -> float:
    """The share of answers that differ from every other (case and whitespace folded): 1.0
    when each item gets its own answer, 1/n when the model says the same thing to all."""
    return len({_fold(a) for a in answers}) / len(answers) if answers else 0.0


def query_text(entry: dict) -> str:
    """What the retrieval baseline matches on: the instruction and its input."""
    return f"{entry['instruction']}\n{entry.get('input', '')}"


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

"""The `baseline_instruct` stage: answer each instruction with the training output of the
nearest training instruction (TF-IDF over instruction + input, cosine), on exactly the
split the instruction model is scored on, so every report shows whether the model beats
looking the answer up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..answers import BASELINE_RESPONSES, distinct_share, item_scores, mean_scores, query_text
from ..config import BaselineInstructConfig
from ..files import write_json


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
    from ..plots import write_item_scores
    from ..prepared import read_instruct_split

    paths = ctx.paths
    t0 = time.perf_counter()
    train = read_instruct_split(paths, "train")
    metrics: dict[str, Any] = {}
    for part in ("val", "test"):
        entries = read_instruct_split(paths, part)
        answers = nearest_outputs(train, entries, cfg)
        rows = item_scores([e["output"] for e in entries], answers)
        metrics.update(mean_scores(rows, f"{part}_"), **{f"{part}_distinct_answers": distinct_share(answers)})
    responses = [
        {**{k: e.get(k, "") for k in ("instruction", "input", "output")}, "baseline_response": a, **r}
        for e, a, r in zip(entries, answers, rows)
    ]
    write_json(Path(paths.metrics) / BASELINE_RESPONSES, responses, indent=1)
    write_item_scores(paths.plots, "baseline_instruct", rows)
    metrics.update(train_records=len(train), wall_time_s=time.perf_counter() - t0)
    return metrics

"""The `baseline_spam` stage: TF-IDF + logistic regression on exactly the classifier's
split, so every report shows whether the LLM beats the classic baseline."""

from __future__ import annotations

import time
from typing import Any

from ..config import BaselineConfig
from ..metrics import classification_metrics
from ..prepared import heldout_full_rows, read_spam_split, spam_train_rows, traffic_metrics


def run(cfg: BaselineConfig, ctx) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    paths = ctx.paths
    parts = {p: read_spam_split(paths, p) for p in ("val", "test")}
    parts["train"] = spam_train_rows(paths, cfg.train_data)
    parts["heldout_full"] = heldout_full_rows(paths, parts["train"])
    t0 = time.perf_counter()
    vec = TfidfVectorizer(max_features=cfg.max_features or None, ngram_range=(1, cfg.ngram_max))
    X = vec.fit_transform([t for t, _ in parts["train"]])
    clf = LogisticRegression(C=cfg.C, max_iter=1000).fit(X, [y for _, y in parts["train"]])
    metrics: dict[str, Any] = {}
    for p, rows in parts.items():
        pred = clf.predict(vec.transform([t for t, _ in rows])).tolist()
        metrics.update(classification_metrics([y for _, y in rows], pred, f"{p}_"))
    metrics["wall_time_s"] = time.perf_counter() - t0
    metrics.update(traffic_metrics(paths, metrics))
    metrics.update(train_messages=len(parts["train"]), heldout_full_messages=len(parts["heldout_full"]))
    return metrics

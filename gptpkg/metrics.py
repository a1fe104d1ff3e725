"""Classification figures shared by the classifier, the baseline and the export check."""

from __future__ import annotations

from typing import Sequence


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], prefix: str = "") -> dict[str, float | list]:
    """Accuracy, spam (label 1) precision/recall/F1 and the confusion matrix
    [[tn, fp], [fn, tp]] (rows = truth ham/spam, columns = predicted)."""
    if len(y_true) != len(y_pred) or not len(y_true):
        raise ValueError(f"need equal, non-empty label lists, got {len(y_true)} and {len(y_pred)}")
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == 1 and p == 1)
    tn = sum(1 for t, p in zip(y_true, y_pred) if t == 0 and p == 0)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t == 0 and p == 1)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == 1 and p == 0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        f"{prefix}accuracy": (tp + tn) / len(y_true),
        f"{prefix}spam_precision": precision,
        f"{prefix}spam_recall": recall,
        f"{prefix}spam_f1": f1,
        f"{prefix}confusion": [[tn, fp], [fn, tp]],
    }

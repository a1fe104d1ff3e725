"""Classification figures shared by the classifier, the baseline and the export check."""

from __future__ import annotations

from collections.abc import Sequence


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], prefix: str = "") -> dict[str, float | list]:
    """Accuracy, spam (label 1) precision/recall/F1 and the confusion matrix
    [[tn, fp], [fn, tp]] (rows = truth ham/spam, columns = predicted), by scikit-learn.
    A figure whose denominator is zero (no message predicted spam, no spam message) is 0."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    if len(y_true) != len(y_pred) or not len(y_true):
        raise ValueError(f"need equal, non-empty label lists, got {len(y_true)} and {len(y_pred)}")
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=[1], average=None, zero_division=0.0
    )
    return {
        f"{prefix}accuracy": float(accuracy_score(y_true, y_pred)),
        f"{prefix}spam_precision": float(precision[0]),
        f"{prefix}spam_recall": float(recall[0]),
        f"{prefix}spam_f1": float(f1[0]),
        f"{prefix}confusion": confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
    }


def at_spam_share(confusion: Sequence[Sequence[int]], spam_share: float, prefix: str = "") -> dict[str, float]:
    """Accuracy and spam F1 expected on traffic with `spam_share` spam, from the
    per-class recalls of `confusion` ([[tn, fp], [fn, tp]]).

    A held-out set's own mix may differ from the traffic a deployed classifier meets
    (the book's test split is 50% spam, the collection ~13%; training on every message
    leaves a held-out set of ~41% spam). Recalls do not depend on the mix, so the
    figures at another mix follow from them: accuracy = s * TPR + (1 - s) * TNR,
    precision = s * TPR / (s * TPR + (1 - s) * FPR).
    """
    (tn, fp), (fn, tp) = confusion
    if not (tn + fp) or not (fn + tp):
        raise ValueError(f"need both classes in the confusion matrix, got {confusion}")
    if not 0.0 < spam_share < 1.0:
        raise ValueError(f"spam_share must be in (0, 1), got {spam_share}")
    tpr, fpr = tp / (fn + tp), fp / (tn + fp)
    flagged = spam_share * tpr + (1 - spam_share) * fpr
    precision = spam_share * tpr / flagged if flagged else 0.0
    f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr else 0.0
    return {f"{prefix}accuracy": spam_share * tpr + (1 - spam_share) * (1 - fpr), f"{prefix}spam_f1": f1}

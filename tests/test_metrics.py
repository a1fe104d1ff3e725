import pytest

from gptpkg.metrics import at_spam_share, classification_metrics


def test_at_spam_share_by_hand():
    # TPR = 45/50 = 0.9, FPR = 10/100 = 0.1
    conf = [[90, 10], [5, 45]]
    even = at_spam_share(conf, 0.5)
    assert even["accuracy"] == pytest.approx(0.9) and even["spam_f1"] == pytest.approx(0.9)
    rare = at_spam_share(conf, 0.1, "t_")
    # precision = 0.09 / (0.09 + 0.09) = 0.5; F1 = 2 * 0.5 * 0.9 / 1.4
    assert rare["t_accuracy"] == pytest.approx(0.9)
    assert rare["t_spam_f1"] == pytest.approx(2 * 0.5 * 0.9 / 1.4)


def test_at_spam_share_at_the_sets_own_mix_is_the_plain_figures():
    y_true = [0] * 100 + [1] * 50
    y_pred = [0] * 90 + [1] * 10 + [0] * 5 + [1] * 45
    plain = classification_metrics(y_true, y_pred)
    again = at_spam_share(plain["confusion"], 50 / 150)
    assert again["accuracy"] == pytest.approx(plain["accuracy"])
    assert again["spam_f1"] == pytest.approx(plain["spam_f1"])


@pytest.mark.parametrize("conf, share", [([[0, 0], [5, 45]], 0.1), ([[90, 10], [5, 45]], 1.0)])
def test_at_spam_share_rejects_what_it_cannot_reweight(conf, share):
    with pytest.raises(ValueError):
        at_spam_share(conf, share)


def test_classification_metrics_by_hand():
    # tn=90 fp=10 fn=5 tp=45: precision 45/55, recall 45/50, F1 = 2tp / (2tp + fp + fn)
    y_true = [0] * 100 + [1] * 50
    y_pred = [0] * 90 + [1] * 10 + [0] * 5 + [1] * 45
    m = classification_metrics(y_true, y_pred, "test_")
    assert m["test_confusion"] == [[90, 10], [5, 45]]
    assert m["test_accuracy"] == 135 / 150
    assert m["test_spam_precision"] == 45 / 55 and m["test_spam_recall"] == 45 / 50
    assert m["test_spam_f1"] == 90 / 105
    assert all(type(v) is float for k, v in m.items() if k != "test_confusion")


@pytest.mark.filterwarnings("error::sklearn.exceptions.UndefinedMetricWarning")  # zero_division is set
@pytest.mark.parametrize(
    "y_true, y_pred, confusion",
    [([0, 0, 0], [0, 0, 0], [[3, 0], [0, 0]]), ([1, 1], [0, 0], [[0, 0], [2, 0]]), ([0], [1], [[0, 1], [0, 0]])],
)
def test_classification_metrics_without_predicted_or_true_spam_are_zero(y_true, y_pred, confusion):
    m = classification_metrics(y_true, y_pred)
    assert m["confusion"] == confusion
    assert m["spam_precision"] == m["spam_recall"] == m["spam_f1"] == 0.0


def test_classification_metrics_rejects_unequal_lists():
    with pytest.raises(ValueError, match="equal, non-empty"):
        classification_metrics([0, 1], [0])

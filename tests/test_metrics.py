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

"""finetune_spam.cv_folds: k-fold cross-validation over the classifier's training
messages. The folds on the real training data (through the real `fetch` and `prepare`
stages), and real tiny CV runs of the stage on a handful of real messages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import params_in

from gptpkg.config import ConfigError
from gptpkg.data import DataError, stratified_group_folds
from gptpkg.metrics import at_spam_share, classification_metrics
from gptpkg.prepared import contains_any, read_spam_split, spam_train_rows, text_key


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, _offline_env):
    """The real `fetch` and `prepare` stages run into a scratch folder: its `Paths`."""
    from gptpkg.runner import run_stage

    params = params_in(tmp_path_factory.mktemp("cv"))
    run_stage("fetch", params)
    run_stage("prepare", params)
    return params.paths


# ---------------------------------------------------------------------------------
# The folds


@pytest.mark.parametrize("train_data", ["book", "all"])
def test_folds_are_disjoint_cover_stratified_and_hold_no_val_or_test_text(prepared, train_data):
    rows = spam_train_rows(prepared, train_data)
    labels, keys = [y for _, y in rows], [text_key(t) for t, _ in rows]
    k = 5
    folds = stratified_group_folds(labels, keys, k, seed=123)
    assert len(folds) == k
    # disjoint and covering: every training message is held out exactly once
    assert sorted(i for f in folds for i in f) == list(range(len(rows)))
    # identical texts (the collection repeats some up to 12 times) share a fold
    fold_of: dict[str, int] = {}
    for f, idx in enumerate(folds):
        for i in idx:
            assert fold_of.setdefault(keys[i], f) == f, rows[i][0]
    assert max(Counter(keys).values()) > 1  # the grouping above was really exercised
    # stratified: each fold holds its share of spam and of ham, to within one group
    largest = max(Counter(keys).values())
    for label in (0, 1):
        per_fold = [sum(labels[i] == label for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= largest, (label, per_fold)
    share = sum(labels) / len(labels)
    for f in folds:
        assert abs(sum(labels[i] for i in f) / len(f) - share) < 0.01
    # The folds are index sets of the training messages, so they hold a val or test text
    # only if the training data does: with `all` (the default) none; the book's own train
    # split repeats some test texts (tests/test_spam_leakage.py counts them).
    held = {text_key(t) for part in ("val", "test") for t, _ in read_spam_split(prepared, part)}
    in_folds = [rows[i][0] for f in folds for i in f if contains_any(rows[i][0], held)]
    assert sorted(in_folds) == sorted(t for t, _ in rows if contains_any(t, held))
    assert (len(in_folds) == 0) == (train_data == "all")
    # deterministic from the seed
    assert stratified_group_folds(labels, keys, k, seed=123) == folds
    assert stratified_group_folds(labels, keys, k, seed=124) != folds


def test_folds_reject_too_few_groups_and_k_below_two():
    labels, groups = [0, 0, 0, 1, 1, 1], ["a", "b", "c", "s", "s", "t"]  # spam: 2 distinct texts
    folds = stratified_group_folds(labels, groups, 2, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(6))
    assert [sum(labels[i] for i in f) for f in folds] in ([2, 1], [1, 2])  # "s" (2 items) stays whole
    with pytest.raises(DataError, match="label 1 has 2 distinct item group"):
        stratified_group_folds(labels, groups, 3, seed=0)
    with pytest.raises(ValueError, match="k >= 2"):
        stratified_group_folds(labels, groups, 1, seed=0)


# ---------------------------------------------------------------------------------
# The stage: real tiny CV runs on a handful of real messages


@pytest.fixture
def handful(prepared, tmp_path):
    """params for a tiny scratch classifier on 21 training messages (10 ham, 10 spam and
    one spam text twice), 4 val and 4 test messages, every output under tmp_path."""
    train = read_spam_split(prepared, "train")
    ham, spam = [r for r in train if r[1] == 0][:10], [r for r in train if r[1] == 1][:10]

    def balanced(part: str, n: int) -> list:
        rows = read_spam_split(prepared, part)
        return [r for r in rows if r[1] == 0][:n] + [r for r in rows if r[1] == 1][:n]

    parts = {"train": ham + spam + [spam[0]], "val": balanced("val", 2), "test": balanced("test", 2)}
    parts["all"] = parts["train"] + parts["val"] + parts["test"]
    spam_dir = tmp_path / "processed" / "spam"
    spam_dir.mkdir(parents=True)
    for part, rows in parts.items():
        (spam_dir / f"{part}.jsonl").write_text(
            "\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n", encoding="utf-8"
        )

    def params(out: str, *overrides: str, **keys):
        """Every output under tmp_path/out, reading the messages above; `keys`: more
        finetune_spam keys, `overrides`: other section.key=value."""
        return params_in(
            tmp_path / out,
            f"paths.processed={tmp_path / 'processed'}",
            "finetune_spam.init=scratch",
            "finetune_spam.model=tiny",
            "finetune_spam.max_length=32",
            "finetune_spam.train_data=book",
            "finetune_spam.epochs=1.0",
            "finetune_spam.max_steps=3",
            "finetune_spam.batch_size=4",
            "finetune_spam.warmup_steps=1",
            "finetune_spam.eval_every=0",
            *[f"finetune_spam.{k}={v}" for k, v in keys.items()],
            *overrides,
        )

    return params, parts


def test_cv_run_reports_pooled_held_out_figures_and_leaves_the_final_model_alone(handful, capsys):
    from gptpkg.runner import RUNTIME_KEYS, run_stage
    from gptpkg.stages.finetune_spam import PREDICTIONS_FILE

    params, parts = handful
    p_plain, p_cv = params("plain", cv_folds=0), params("cv", cv_folds=3)
    run_stage("finetune_spam", p_plain, progress=False)
    run_stage("finetune_spam", p_cv, progress=False)
    out = capsys.readouterr().out
    for i in (1, 2, 3):
        assert f"cv fold {i}/3 trained on" in out
    plain_metrics, cv_metrics = Path(p_plain.paths.metrics), Path(p_cv.paths.metrics)
    plain = json.loads((plain_metrics / "finetune_spam.json").read_text())
    cv = json.loads((cv_metrics / "finetune_spam.json").read_text())
    runtime = json.loads((cv_metrics / "runtime" / "finetune_spam.json").read_text())
    assert "cv_accuracy" not in plain
    assert runtime["cv_wall_time_s"] > 0 and not set(cv) & set(RUNTIME_KEYS)
    # the final model and every other figure are those of the run without CV
    assert {k: v for k, v in cv.items() if not k.startswith("cv_")} == plain
    for f in ("model.safetensors", "config.json"):
        assert (Path(p_cv.paths.spam_classifier) / f).read_bytes() == (
            Path(p_plain.paths.spam_classifier) / f
        ).read_bytes()
    # every training message was predicted exactly once, by a model that did not train on it
    (tn, fp), (fn, tp) = cv["cv_confusion"]
    labels = [y for _, y in parts["train"]]
    assert (tn + fp, fn + tp) == (labels.count(0), labels.count(1)) == (10, 11)
    assert cv["cv_folds"] == 3
    assert cv["cv_accuracy"] == pytest.approx((tn + tp) / 21)
    assert cv["cv_balanced_accuracy"] == pytest.approx((tn / 10 + tp / 11) / 2)
    assert cv["cv_balanced_accuracy"] == pytest.approx(at_spam_share(cv["cv_confusion"], 0.5)["accuracy"])
    assert 0.0 <= cv["cv_spam_f1"] <= 1.0
    # the predictions file: per message its spam probability, whose 0.5 decision gives
    # every confusion matrix above (CV: held out; val/test: the final model)
    pred = json.loads((cv_metrics / PREDICTIONS_FILE).read_text())
    assert (pred["cv_folds"], pred["cv_seed"]) == (3, 123)
    assert sorted((r["text"], r["label"]) for r in pred["cv"]) == sorted(map(tuple, parts["train"]))
    for part, prefix in (("cv", "cv_"), ("val", "val_"), ("test", "test_")):
        rows = pred[part]
        assert all(0.0 <= r["spam_probability"] <= 1.0 for r in rows)
        assert (
            classification_metrics(
                [r["label"] for r in rows], [int(r["spam_probability"] > 0.5) for r in rows], prefix
            )[f"{prefix}confusion"]
            == cv[f"{prefix}confusion"]
        )
    assert [(r["text"], r["label"]) for r in pred["test"]] == [tuple(r) for r in parts["test"]]
    plain_pred = json.loads((plain_metrics / PREDICTIONS_FILE).read_text())
    assert plain_pred["cv"] == [] and plain_pred["cv_folds"] == 0
    assert plain_pred["test"] == pred["test"] and plain_pred["val"] == pred["val"]


def test_cross_validate_trains_each_fold_on_the_others_from_the_same_init(handful, tok):
    """cross_validate with the real fit and predict: what each fold trains on, and that
    the initial model it copies is left untouched."""
    from gptpkg.config import TrainConfig
    from gptpkg.data import ClassificationDataset, classification_collate
    from gptpkg.model import GPT, GPTClassifier
    from gptpkg.presets import model_config
    from gptpkg.stages.finetune_spam import cross_validate, predict_proba
    from gptpkg.train import Task, classification_loss, fit, plan_run

    _, parts = handful
    rows = parts["train"]
    ds = ClassificationDataset(rows, tok, 32)
    torch.manual_seed(0)
    init = GPTClassifier(GPT(model_config("tiny")), 2)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    seen: list[tuple[list, list]] = []
    cfg = TrainConfig(max_steps=2, epochs=0, batch_size=4, eval_every=0)

    def train_fn(model, subset):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a fresh copy of init
        trained = [tok.decode(ids) for ids in subset.ids]
        fit(model, plan_run(cfg, model, subset, classification_collate), Task(subset, classification_loss(None)))
        seen.append((trained, []))

    def predict_fn(model, subset):
        seen[-1][1].extend(tok.decode(ids) for ids in subset.ids)
        return predict_proba(model, subset)

    m, prob = cross_validate(init, ds, [t for t, _ in rows], 3, 123, train_fn, predict_fn)
    assert sorted(prob) == list(range(len(rows))) and all(0.0 <= p <= 1.0 for p in prob.values())
    assert all(torch.equal(v, before[k]) for k, v in init.state_dict().items())
    assert len(seen) == 3
    held_all = [t for _, held in seen for t in held]
    assert sorted(held_all) == sorted(tok.decode(ids) for ids in ds.ids)  # each message held out once
    for trained, held in seen:
        assert not set(trained) & set(held)  # the duplicated spam text is never on both sides
        assert len(trained) + len(held) == len(rows)
    assert sum(map(sum, m["cv_confusion"])) == len(rows)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("cv_folds", 1, "params.finetune_spam.cv_folds: expected 0 (off) or a number of folds >= 2, got 1"),
        ("cv_folds", -2, "params.finetune_spam.cv_folds: expected 0 (off) or a number of folds >= 2, got -2"),
        ("cv_folds", "five", "params.finetune_spam.cv_folds: expected an integer, got 'five'"),
        ("cv_folds", 2.5, "params.finetune_spam.cv_folds: expected an integer, got 2.5"),
        # finetune_spam.soup (tests/test_soup.py): the number of fine-tunings averaged
        ("soup", 0, "params.finetune_spam.soup: expected an integer >= 1 (the number of fine-tunings averaged), got 0"),
        ("soup", "three", "params.finetune_spam.soup: expected an integer, got 'three'"),
        # finetune_spam.decision_spam_share (tests/test_decision.py)
        (
            "decision_spam_share",
            1.0,
            "params.finetune_spam.decision_spam_share: expected null (decide as trained) or a "
            "spam share strictly between 0 and 1, got 1.0",
        ),
        (
            "decision_spam_share",
            0,
            "params.finetune_spam.decision_spam_share: expected null (decide as trained) or a "
            "spam share strictly between 0 and 1, got 0",
        ),
    ],
)
def test_bad_cv_folds_soup_or_decision_spam_share_is_a_config_error(handful, key, value, message):
    """The params tree refuses the value when it is loaded: no stage can start with it."""
    params, _ = handful
    with pytest.raises(ConfigError) as e:
        params("bad", **{key: value})
    assert message in str(e.value)


def test_more_cv_folds_than_distinct_texts_is_a_config_error_before_any_training(handful):
    from gptpkg.runner import run_stage

    params, _ = handful
    p = params("bad", cv_folds=11)
    out = Path(p.paths.spam_classifier)
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"earlier output")
    with pytest.raises(ConfigError) as e:
        run_stage("finetune_spam", p, progress=False)
    assert (
        "params.finetune_spam.cv_folds=11: expected at most 10 folds: the 21 training messages hold "
        "10 distinct ham and 10 distinct spam texts"
    ) in str(e.value)
    assert (out / "model.safetensors").read_bytes() == b"earlier output"
    assert not Path(p.paths.metrics).exists()

"""finetune_spam.cv_folds: k-fold cross-validation over the classifier's training
messages. The folds on the real training data (through the real `fetch` and `prepare`
stages), and real tiny CV runs of the stage on a handful of real messages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from gptpkg.config import ConfigError, load_params
from gptpkg.data import DataError, stratified_group_folds
from gptpkg.metrics import at_spam_share, classification_metrics
from gptpkg.stages import contains_any, fetch, paths_of, prepare, read_spam_split, spam_train_rows, text_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, _offline_env):
    work = tmp_path_factory.mktemp("cv")
    params = load_params(ROOT / "params.yaml", [f"paths.{k}={work / k}" for k in ("raw", "processed", "metrics")])
    fetch(params)
    prepare(params)
    return paths_of(params)


# ---------------------------------------------------------------------------------
# The folds


@pytest.mark.parametrize("train_data", ["book", "all"])
def test_folds_are_disjoint_cover_stratified_and_hold_no_val_or_test_text(prepared, train_data):
    rows = spam_train_rows(prepared, train_data, "params.finetune_spam")
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
        (spam_dir / f"{part}.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n",
                                                 encoding="utf-8")

    def params(out: str, **keys) -> dict:
        over = [f"paths.processed={tmp_path / 'processed'}", "wandb.mode=disabled",
                *[f"paths.{k}={tmp_path / out / k}" for k in ("spam_classifier", "metrics", "plots", "wandb")],
                "finetune_spam.init=scratch", "finetune_spam.model=tiny", "finetune_spam.max_length=32",
                "finetune_spam.train_data=book", "finetune_spam.epochs=1.0", "finetune_spam.max_steps=3",
                "finetune_spam.batch_size=4", "finetune_spam.warmup_steps=1", "finetune_spam.eval_every=0",
                *[f"finetune_spam.{k}={v}" for k, v in keys.items()]]
        return load_params(ROOT / "params.yaml", over)

    return params, parts


def test_cv_run_reports_pooled_held_out_figures_and_leaves_the_final_model_alone(handful, capsys):
    from gptpkg.runner import RUNTIME_KEYS, run_stage

    params, parts = handful
    run_stage("finetune_spam", params("plain", cv_folds=0), progress=False)
    run_stage("finetune_spam", params("cv", cv_folds=3), progress=False)
    out = capsys.readouterr().out
    for i in (1, 2, 3):
        assert f"cv fold {i}/3 trained on" in out
    root = Path(params("cv")["paths"]["metrics"]).parent.parent
    plain = json.loads((root / "plain" / "metrics" / "finetune_spam.json").read_text())
    cv = json.loads((root / "cv" / "metrics" / "finetune_spam.json").read_text())
    runtime = json.loads((root / "cv" / "metrics" / "runtime" / "finetune_spam.json").read_text())
    assert "cv_accuracy" not in plain
    assert runtime["cv_wall_time_s"] > 0 and not set(cv) & set(RUNTIME_KEYS)
    # the final model and every other figure are those of the run without CV
    assert {k: v for k, v in cv.items() if not k.startswith("cv_")} == plain
    for f in ("model.safetensors", "config.json"):
        assert (root / "cv" / "spam_classifier" / f).read_bytes() == (root / "plain" / "spam_classifier" / f).read_bytes()
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
    pred = json.loads((root / "cv" / "metrics" / "finetune_spam_predictions.json").read_text())
    assert (pred["cv_folds"], pred["cv_seed"]) == (3, 123)
    assert sorted((r["text"], r["label"]) for r in pred["cv"]) == sorted(map(tuple, parts["train"]))
    for part, prefix in (("cv", "cv_"), ("val", "val_"), ("test", "test_")):
        rows = pred[part]
        assert all(0.0 <= r["spam_probability"] <= 1.0 for r in rows)
        assert classification_metrics([r["label"] for r in rows], [int(r["spam_probability"] > 0.5) for r in rows],
                                      prefix)[f"{prefix}confusion"] == cv[f"{prefix}confusion"]
    assert [(r["text"], r["label"]) for r in pred["test"]] == [tuple(r) for r in parts["test"]]
    plain_pred = json.loads((root / "plain" / "metrics" / "finetune_spam_predictions.json").read_text())
    assert plain_pred["cv"] == [] and plain_pred["cv_folds"] == 0
    assert plain_pred["test"] == pred["test"] and plain_pred["val"] == pred["val"]


def test_cross_validate_trains_each_fold_on_the_others_from_the_same_init(handful, tok):
    """cross_validate with the real fit and predict: what each fold trains on, and that
    the initial model it copies is left untouched."""
    from gptpkg.config import TrainConfig, model_config
    from gptpkg.data import ClassificationDataset, classification_collate
    from gptpkg.finetune import cross_validate, predict_proba
    from gptpkg.model import GPT
    from gptpkg.train import classification_loss, fit

    _, parts = handful
    rows = parts["train"]
    ds = ClassificationDataset(rows, tok, 32)
    torch.manual_seed(0)
    init = GPT(model_config("tiny")).to_classifier(2)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    seen: list[tuple[list, list]] = []
    cfg = TrainConfig(max_steps=2, epochs=0, batch_size=4, eval_every=0)

    def train_fn(model, subset, desc):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a fresh copy of init
        trained = [tok.decode(ids) for ids in subset.ids]
        fit(model, subset, classification_collate, cfg, loss_fn=classification_loss(None), progress=False)
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


def test_cross_validate_train_only_messages_train_in_every_fold_and_are_never_held_out(handful, tok):
    """train_only (train_data=nontest's validation messages): every fold trains on them,
    none holds them out, and the folds of the other messages are those without them."""
    from gptpkg.config import TrainConfig, model_config
    from gptpkg.data import ClassificationDataset, classification_collate
    from gptpkg.finetune import cross_validate, predict_proba
    from gptpkg.model import GPT
    from gptpkg.train import classification_loss, fit

    _, parts = handful
    extra = parts["val"]  # 2 ham, 2 spam
    rows = extra[:1] + parts["train"] + extra[1:]  # train-only messages first, inside and last
    fixed = [0] + list(range(len(parts["train"]) + 1, len(rows)))
    ds = ClassificationDataset(rows, tok, 32)
    torch.manual_seed(0)
    init = GPT(model_config("tiny")).to_classifier(2)
    cfg = TrainConfig(max_steps=1, epochs=0, batch_size=4, eval_every=0)
    seen: list[tuple[list, list]] = []

    def train_fn(model, subset, desc):
        fit(model, subset, classification_collate, cfg, loss_fn=classification_loss(None), progress=False)
        seen.append(([tok.decode(ids) for ids in subset.ids], []))

    def predict_fn(model, subset):
        seen[-1][1].extend(tok.decode(ids) for ids in subset.ids)
        return predict_proba(model, subset)

    m, prob = cross_validate(init, ds, [t for t, _ in rows], 3, 123, train_fn, predict_fn, train_only=fixed)
    assert sorted(prob) == [i for i in range(len(rows)) if i not in fixed]  # train-only: never held out
    extra_texts = [tok.decode(ds.ids[i]) for i in fixed]
    for trained, held in seen:
        assert all(t in trained for t in extra_texts) and not set(extra_texts) & set(held)
    # the held-out folds are exactly those of the training messages alone
    alone = stratified_group_folds([y for _, y in parts["train"]], [text_key(t) for t, _ in parts["train"]], 3, 123)
    assert [sorted(h) for _, h in seen] == [sorted(tok.decode(ds.ids[i + 1]) for i in f) for f in alone]
    assert sum(map(sum, m["cv_confusion"])) == len(parts["train"]) and m["cv_train_only_messages"] == 4
    # a train-only text that is also cross-validated would be trained on while held out:
    # rows[11] is the spam text the training messages hold twice (also rows[21])
    assert rows[11] == rows[21] == parts["train"][10]
    with pytest.raises(ValueError, match="1 cross-validated message.* share a text with a train-only message"):
        cross_validate(init, ds, [t for t, _ in rows], 3, 123, train_fn, predict_fn, train_only=[11])


def test_cv_with_train_data_nontest_folds_over_the_all_messages(handful):
    """train_data=nontest trains on the validation messages too; its CV figures are over
    the messages holding no validation text, as with train_data=all."""
    from gptpkg.runner import run_stage

    params, parts = handful
    run_stage("finetune_spam", params("nontest", cv_folds=3, train_data="nontest"), progress=False)
    root = Path(params("nontest")["paths"]["metrics"])
    m = json.loads((root / "finetune_spam.json").read_text())
    assert m["train_messages"] == len(parts["train"]) + len(parts["val"]) == 25
    assert m["cv_train_only_messages"] == len(parts["val"])
    (tn, fp), (fn, tp) = m["cv_confusion"]
    assert (tn + fp, fn + tp) == (10, 11)  # the 21 training messages, each held out once


@pytest.mark.parametrize("key, value, message", [
    ("cv_folds", 1, "params.finetune_spam.cv_folds: expected 0 (off) or an integer >= 2 (the number of folds), got 1"),
    ("cv_folds", -2, "params.finetune_spam.cv_folds: expected 0 (off) or an integer >= 2 (the number of folds), got -2"),
    ("cv_folds", "five", "params.finetune_spam.cv_folds: expected int, got 'five'"),
    ("cv_folds", 2.5, "params.finetune_spam.cv_folds: expected int, got 2.5"),
    ("cv_folds", 11, "params.finetune_spam.cv_folds=11: expected at most 10 folds: the 21 cross-validated training messages hold "
                     "10 distinct ham and 10 distinct spam texts (a fold needs one of each)"),
    # finetune_spam.soup (tests/test_soup.py): the number of fine-tunings averaged
    ("soup", 0, "params.finetune_spam.soup: expected an integer >= 1 (the number of fine-tunings averaged into "
                "the classifier; 1 = one fine-tuning), got 0"),
    ("soup", "three", "params.finetune_spam.soup: expected int, got 'three'"),
    # finetune_spam.decision_spam_share (tests/test_decision.py)
    ("decision_spam_share", 1.0, "params.finetune_spam.decision_spam_share: expected null (decide as trained) or a "
                                 "spam share strictly between 0 and 1 (0.5: the book's balanced test mix), got 1.0"),
    ("decision_spam_share", 0, "params.finetune_spam.decision_spam_share: expected null (decide as trained) or a "
                               "spam share strictly between 0 and 1 (0.5: the book's balanced test mix), got 0"),
    # finetune_spam.framing (tests/test_framing.py)
    ("framing", "bos", "params.finetune_spam.framing: expected one of plain|eot, got 'bos'"),
    # finetune_spam.label_smoothing and lr_layer_decay (tests/test_optim.py)
    ("label_smoothing", 1.0, "params.finetune_spam.label_smoothing: expected a share in [0, 1) (0 = off), got 1.0"),
    ("lr_layer_decay", 0.0, "lr_layer_decay must be in (0, 1] (1 = one lr for every layer), got 0.0"),
    ("lr_layer_decay", 1.5, "lr_layer_decay must be in (0, 1] (1 = one lr for every layer), got 1.5"),
])
def test_bad_cv_folds_or_soup_is_a_config_error_before_any_training(handful, key, value, message):
    from gptpkg.runner import run_stage

    params, _ = handful
    p = params("bad")
    p["finetune_spam"][key] = value
    out = Path(p["paths"]["spam_classifier"])
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"earlier output")
    with pytest.raises(ConfigError) as e:
        run_stage("finetune_spam", p, progress=False)
    assert message in str(e.value)
    assert (out / "model.safetensors").read_bytes() == b"earlier output"

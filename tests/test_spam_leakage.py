"""The spam test split is untouched by every training stage: no text of a test message
(exact duplicates, quote/whitespace variants and longer messages quoting it included)
is in any pretraining corpus or in the classifier's training data. Real data from the
offline mirror, through the real `fetch` and `prepare` stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptpkg.config import ConfigError, load_params
from gptpkg.data import book_spam_splits, read_sms_spam
from gptpkg.stages import (
    CORPUS_SOURCES, contains_any, fetch, heldout_full_rows, paths_of, prepare, read_spam_split,
    spam_train_rows, text_key,
)

ROOT = Path(__file__).resolve().parents[1]
# The book's balanced split (seed 123): of its 300 test messages, 37 (32 distinct texts)
# occur verbatim in the book's own 1,045 training messages (the collection holds
# duplicate messages); 40 (35 distinct) when case, whitespace and quotes are ignored
# (text_key); 47 are held by a training message. The README states these figures.
BOOK_TEST_ROWS_VERBATIM_IN_BOOK_TRAIN = (37, 32)
BOOK_TEST_ROWS_ALSO_IN_BOOK_TRAIN = (40, 35)
BOOK_TEST_ROWS_HELD_BY_BOOK_TRAIN = 47


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, _offline_env):
    work = tmp_path_factory.mktemp("leakage")
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    params = load_params(work / "params.yaml", [f"paths.{k}={work / v}" for k, v in
                                                (("raw", "raw"), ("processed", "processed"), ("metrics", "metrics"))])
    fetch(params)
    metrics = prepare(params)
    return params, paths_of(params), metrics


def _keys(rows) -> set[str]:
    return {text_key(t) for t, _ in rows}


def test_text_key_joins_the_two_readings_of_a_quoted_message(shared_data):
    # pandas' quoting (the book's reading) strips the quotes the file has around a message
    book = {t for t, _ in read_sms_spam(shared_data / "SMSSpamCollection", book_quoting=True)}
    exact = {t for t, _ in read_sms_spam(shared_data / "SMSSpamCollection")}
    assert "NONE!NOWHERE IKNO DOESDISCOUNT!SHITINNIT" in book - exact
    assert '"NONE!NOWHERE IKNO DOESDISCOUNT!SHITINNIT"' in exact
    assert text_key('"NONE!NOWHERE  IKNO DOESDISCOUNT!SHITINNIT"') == text_key("none!nowhere ikno doesdiscount!shitinnit")
    assert contains_any("Sorry, I'll call later in meeting", {text_key("Sorry, I'll call later")})
    assert not contains_any("Sorry, I'll call you", {text_key("Sorry, I'll call later")})


def test_book_split_is_the_books_and_its_test_duplicates_are_counted(prepared, shared_data):
    params, paths, metrics = prepared
    assert (metrics["spam/train"], metrics["spam/val"], metrics["spam/test"]) == (1045, 149, 300)
    assert metrics["spam/all"] == 5574
    train = read_spam_split(paths, "train")
    train_texts, train_keys = {t for t, _ in train}, _keys(train)
    test = read_spam_split(paths, "test")
    assert (sum(t in train_texts for t, _ in test), len({t for t, _ in test} & train_texts)) \
        == BOOK_TEST_ROWS_VERBATIM_IN_BOOK_TRAIN
    assert (sum(text_key(t) in train_keys for t, _ in test), len(_keys(test) & train_keys)) \
        == BOOK_TEST_ROWS_ALSO_IN_BOOK_TRAIN
    assert sum(any(contains_any(m, {text_key(t)}) for m, _ in train) for t, _ in test) \
        == BOOK_TEST_ROWS_HELD_BY_BOOK_TRAIN
    assert test == book_spam_splits(shared_data / "SMSSpamCollection", 123).test


def test_no_test_text_in_any_pretraining_corpus(prepared, tok):
    params, paths, metrics = prepared
    test = read_spam_split(paths, "test")
    test_keys = _keys(test)
    for source in CORPUS_SOURCES:
        text = "".join(tok.decode(np.load(Path(paths.processed) / "corpus" / f"{source}.{part}.npy").tolist())
                       for part in ("train", "val"))
        assert text, source
        # no test text, in any reading, inside the whole corpus text
        assert not [t for t, _ in test if t in text], source
        if source == "sms":
            messages = text.split("<|endoftext|>")
            assert len(messages) == metrics["sms_corpus_messages"] > 4900
            assert not [m for m in messages if contains_any(m, test_keys)]
    # and the SMS corpus is every other message: those left out all hold a test text
    all_rows = read_spam_split(paths, "all")
    left_out = [t for t, _ in all_rows if contains_any(t, test_keys)]
    assert len(left_out) + metrics["sms_corpus_messages"] == len(all_rows)


@pytest.mark.parametrize("train_data", ["book", "all", "nontest"])
def test_training_data_and_heldout_full(prepared, train_data):
    params, paths, metrics = prepared
    rows = spam_train_rows(paths, train_data, "params.finetune_spam")
    held = {p: _keys(read_spam_split(paths, p)) for p in ("val", "test")}
    if train_data == "all":
        assert not [t for t, _ in rows if contains_any(t, held["val"] | held["test"])]
        assert 4800 < len(rows) < 4900 and 0.09 < sum(y for _, y in rows) / len(rows) < 0.11
    elif train_data == "nontest":  # `all` plus every validation message (and its repeats)
        assert not [t for t, _ in rows if contains_any(t, held["test"])]
        # every validation text joins, but those holding a test text (duplicates across the split)
        val_in_test = {k for k in held["val"] if contains_any(k, held["test"])}
        assert held["val"] - val_in_test <= _keys(rows) and len(val_in_test) == 9
        all_rows = spam_train_rows(paths, "all", "params.finetune_spam")
        assert [r for r in rows if not contains_any(r[0], held["val"])] == all_rows
        assert (len(rows), sum(y for _, y in rows)) == (5048, 550)  # all: 4,882 and 463 spam
    else:
        assert len(rows) == 1045
    heldout, row_keys = heldout_full_rows(paths, rows), _keys(rows)
    assert not _keys(heldout) & row_keys
    assert len(heldout) + sum(text_key(t) in row_keys for t, _ in read_spam_split(paths, "all")) == 5574
    # test texts missing from heldout_full are exactly those trained on
    missing = held["test"] - _keys(heldout)
    assert len(missing) == (BOOK_TEST_ROWS_ALSO_IN_BOOK_TRAIN[1] if train_data == "book" else 0)


def test_unknown_train_data_is_a_clear_error(prepared):
    params, paths, metrics = prepared
    with pytest.raises(ConfigError, match=r"params.finetune_spam.train_data: expected one of \['book', 'all', 'nontest'\], got 'everything'"):
        spam_train_rows(paths, "everything", "params.finetune_spam")


def test_finetune_and_baseline_report_heldout_full(prepared, tmp_path):
    from gptpkg.baseline import run as run_baseline
    from gptpkg.finetune import run_spam
    from gptpkg.loggers import NullLogger

    params, paths, metrics = prepared
    over = load_params(ROOT / "params.yaml", [
        f"paths.processed={paths.processed}", f"paths.spam_classifier={tmp_path / 'clf'}",
        f"paths.metrics={tmp_path / 'metrics'}",
        "finetune_spam.init=scratch", "finetune_spam.model=tiny", "finetune_spam.max_length=32",
        "finetune_spam.max_steps=2", "finetune_spam.batch_size=8", "finetune_spam.eval_every=0",
        "finetune_spam.train_data=all", "finetune_spam.class_weights=[1.0, 4.0]",
        "finetune_spam.freeze_embeddings=true", "baseline_spam.train_data=all"], profile=None)
    m = run_spam(over, NullLogger(), progress=False)
    assert (tmp_path / "metrics" / "finetune_spam_predictions.json").is_file()  # its outputs stay under tmp_path
    n_train = len(spam_train_rows(paths, "all", "x"))
    assert m["train_messages"] == n_train and m["steps"] == 2
    from gptpkg.config import model_config
    from gptpkg.model import GPT

    tiny = GPT(model_config("tiny"))
    tiny.to_classifier(2)
    assert m["n_trainable_params"] == tiny.num_params() - tiny.tok_emb.weight.numel()
    assert m["heldout_full_messages"] == len(heldout_full_rows(paths, spam_train_rows(paths, "all", "x")))
    for k in ("heldout_full_accuracy", "heldout_full_spam_f1", "test_accuracy", "val_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    cfg = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert cfg["meta"]["train_data"] == "all"
    b = run_baseline(over)
    assert b["train_messages"] == n_train and b["heldout_full_messages"] == m["heldout_full_messages"]
    assert b["heldout_full_accuracy"] > 0.9 and b["test_accuracy"] > 0.9

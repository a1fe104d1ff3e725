"""The spam test split is untouched by every training stage: no text of a test message
(exact duplicates, quote/whitespace variants and longer messages quoting it included)
is in any pretraining corpus or in the classifier's training data. Real data from the
offline mirror, through the real `fetch` and `prepare` stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import params_in

from gptpkg.config import ConfigError
from gptpkg.data import book_spam_splits, read_sms_spam
from gptpkg.prepared import (
    INSTRUCTIONS_SOURCE,
    SMS_SOURCE,
    TEXT_SOURCES,
    contains_any,
    heldout_full_rows,
    read_spam_split,
    spam_train_rows,
    text_key,
)
from gptpkg.shards import split_stream

CORPUS_SOURCES = (*TEXT_SOURCES, SMS_SOURCE, INSTRUCTIONS_SOURCE)  # every source a pretraining corpus can name
# The book's balanced split (seed 123): of its 300 test messages, 37 (32 distinct texts)
# occur verbatim in the book's own 1,045 training messages (the collection holds
# duplicate messages); 40 (35 distinct) when case, whitespace and quotes are ignored
# (text_key); 47 are held by a training message. docs/experiments/spam-classifier.md states
# these figures.
BOOK_TEST_ROWS_VERBATIM_IN_BOOK_TRAIN = (37, 32)
BOOK_TEST_ROWS_ALSO_IN_BOOK_TRAIN = (40, 35)
BOOK_TEST_ROWS_HELD_BY_BOOK_TRAIN = 47


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, _offline_env):
    from gptpkg.runner import run_stage

    params = params_in(tmp_path_factory.mktemp("leakage"))
    run_stage("fetch", params)
    metrics = run_stage("prepare", params)
    return params, params.paths, metrics


def _keys(rows) -> set[str]:
    return {text_key(t) for t, _ in rows}


def test_text_key_joins_the_two_readings_of_a_quoted_message(shared_data):
    # pandas' quoting (the book's reading) strips the quotes the file has around a message
    book = {t for t, _ in read_sms_spam(shared_data / "SMSSpamCollection", book_quoting=True)}
    exact = {t for t, _ in read_sms_spam(shared_data / "SMSSpamCollection")}
    assert "NONE!NOWHERE IKNO DOESDISCOUNT!SHITINNIT" in book - exact
    assert '"NONE!NOWHERE IKNO DOESDISCOUNT!SHITINNIT"' in exact
    assert text_key('"NONE!NOWHERE  IKNO DOESDISCOUNT!SHITINNIT"') == text_key(
        "none!nowhere ikno doesdiscount!shitinnit"
    )
    assert contains_any("Sorry, I'll call later in meeting", {text_key("Sorry, I'll call later")})
    assert not contains_any("Sorry, I'll call you", {text_key("Sorry, I'll call later")})


def test_book_split_is_the_books_and_its_test_duplicates_are_counted(prepared, shared_data):
    params, paths, metrics = prepared
    assert (metrics["spam/train"], metrics["spam/val"], metrics["spam/test"]) == (1045, 149, 300)
    assert metrics["spam/all"] == 5574
    train = read_spam_split(paths, "train")
    train_texts, train_keys = {t for t, _ in train}, _keys(train)
    test = read_spam_split(paths, "test")
    assert (
        sum(t in train_texts for t, _ in test),
        len({t for t, _ in test} & train_texts),
    ) == BOOK_TEST_ROWS_VERBATIM_IN_BOOK_TRAIN
    assert (
        sum(text_key(t) in train_keys for t, _ in test),
        len(_keys(test) & train_keys),
    ) == BOOK_TEST_ROWS_ALSO_IN_BOOK_TRAIN
    assert (
        sum(any(contains_any(m, {text_key(t)}) for m, _ in train) for t, _ in test) == BOOK_TEST_ROWS_HELD_BY_BOOK_TRAIN
    )
    assert test == book_spam_splits(shared_data / "SMSSpamCollection", 123).test


def _decoded(paths, tok, source: str, part: str) -> str:
    """The text of one source's split, read back from its token shards."""
    stream = split_stream(Path(paths.processed) / "corpus", [source], part)
    return tok.decode(stream.read(0, len(stream)).tolist()) if len(stream) else ""


def test_no_test_text_in_any_pretraining_corpus(prepared, tok):
    params, paths, metrics = prepared
    test = read_spam_split(paths, "test")
    test_keys = _keys(test)
    for source in CORPUS_SOURCES:
        text = "".join(_decoded(paths, tok, source, part) for part in ("train", "val"))
        assert text, source
        # no test text, in any reading, inside the whole corpus text
        assert not [t for t, _ in test if t in text], source
        if source == "sms":
            messages = text.split("<|endoftext|>")[:-1]  # every message ends with the token
            assert len(messages) == metrics["sms_corpus_messages"] > 4900
            assert not [m for m in messages if contains_any(m, test_keys)]
    # and the SMS corpus is every other message: those left out all hold a test text
    all_rows = read_spam_split(paths, "all")
    left_out = [t for t, _ in all_rows if contains_any(t, test_keys)]
    assert len(left_out) + metrics["sms_corpus_messages"] == len(all_rows)


def test_instructions_corpus_is_the_instruction_training_split_only(prepared, tok):
    from gptpkg.data import format_prompt, format_response
    from gptpkg.prepared import read_instruct_split

    params, paths, metrics = prepared
    text = "".join(_decoded(paths, tok, INSTRUCTIONS_SOURCE, part) for part in ("train", "val"))
    records = text.split("<|endoftext|>")[:-1]  # every record ends with the token
    train = read_instruct_split(paths, "train")
    # the validation share is whole records chosen by their hash: the same records, in another order
    assert sorted(records) == sorted(format_prompt(e) + format_response(e) for e in train)
    train_texts = {e["instruction"] + e.get("input", "") + e["output"] for e in train}
    for part in ("val", "test"):
        for e in read_instruct_split(paths, part):
            if e["instruction"] + e.get("input", "") + e["output"] not in train_texts:  # no duplicate record
                assert format_prompt(e) + format_response(e) not in text, (part, e["instruction"])


@pytest.mark.parametrize("train_data", ["book", "all"])
def test_training_data_and_heldout_full(prepared, train_data):
    params, paths, metrics = prepared
    rows = spam_train_rows(paths, train_data)
    held = {p: _keys(read_spam_split(paths, p)) for p in ("val", "test")}
    if train_data == "all":
        assert not [t for t, _ in rows if contains_any(t, held["val"] | held["test"])]
        assert 4800 < len(rows) < 4900 and 0.09 < sum(y for _, y in rows) / len(rows) < 0.11
    else:
        assert len(rows) == 1045
    heldout, row_keys = heldout_full_rows(paths, rows), _keys(rows)
    assert not _keys(heldout) & row_keys
    assert len(heldout) + sum(text_key(t) in row_keys for t, _ in read_spam_split(paths, "all")) == 5574
    # test texts missing from heldout_full are exactly those trained on
    missing = held["test"] - _keys(heldout)
    assert len(missing) == (BOOK_TEST_ROWS_ALSO_IN_BOOK_TRAIN[1] if train_data == "book" else 0)


@pytest.mark.parametrize("section", ["finetune_spam", "baseline_spam"])
def test_unknown_train_data_is_a_clear_error(tmp_path, section):
    with pytest.raises(ConfigError, match=rf"params.{section}.train_data: expected book\|all, got 'everything'"):
        params_in(tmp_path, f"{section}.train_data=everything")


def test_finetune_and_baseline_report_heldout_full(prepared, tmp_path):
    from gptpkg.runner import run_stage
    from gptpkg.stages.finetune_spam import PREDICTIONS_FILE

    params, paths, metrics = prepared
    over = params_in(
        tmp_path,
        f"paths.processed={paths.processed}",
        "finetune_spam.init=scratch",
        "finetune_spam.model=tiny",
        "finetune_spam.max_length=32",
        "finetune_spam.max_steps=2",
        "finetune_spam.batch_size=8",
        "finetune_spam.eval_every=0",
        "finetune_spam.train_data=all",
        "finetune_spam.class_weights=[1.0, 4.0]",
        "baseline_spam.train_data=all",
    )
    m = run_stage("finetune_spam", over, progress=False)
    assert Path(over.paths.metrics).is_relative_to(tmp_path)
    assert (Path(over.paths.metrics) / PREDICTIONS_FILE).is_file()  # its outputs stay under tmp_path
    n_train = len(spam_train_rows(paths, "all"))
    assert m["train_messages"] == n_train and m["steps"] == 2
    from gptpkg.model import GPT, GPTClassifier
    from gptpkg.presets import model_config

    tiny = GPTClassifier(GPT(model_config("tiny")), 2)
    assert m["n_trainable_params"] == tiny.num_params()  # trainable: all
    assert m["heldout_full_messages"] == len(heldout_full_rows(paths, spam_train_rows(paths, "all")))
    for k in ("heldout_full_accuracy", "heldout_full_spam_f1", "test_accuracy", "val_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    cfg = json.loads((Path(over.paths.spam_classifier) / "config.json").read_text())
    assert cfg["meta"]["params"]["train_data"] == "all"
    b = run_stage("baseline_spam", over)
    assert b["train_messages"] == n_train and b["heldout_full_messages"] == m["heldout_full_messages"]
    assert b["heldout_full_accuracy"] > 0.9 and b["test_accuracy"] > 0.9

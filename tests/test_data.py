import json

import pytest

from gptpkg.data import (
    ClassificationDataset,
    DataError,
    InstructionDataset,
    TokenWindows,
    book_spam_splits,
    classification_collate,
    format_prompt,
    full_spam_splits,
    instruction_collate,
    read_instructions,
    read_sms_spam,
    split_instructions,
    split_text,
)
from gptpkg.tokenizer import EOT_ID


def test_token_windows():
    ds = TokenWindows(list(range(20)), max_length=4, stride=3)
    assert len(ds) == len(range(0, 16, 3))
    item = ds[1]
    assert item["input_ids"].tolist() == [3, 4, 5, 6]
    assert item["targets"].tolist() == [4, 5, 6, 7]
    with pytest.raises(DataError, match="too short for one window of max_length=30"):
        TokenWindows(list(range(20)), max_length=30, stride=30)
    with pytest.raises(DataError, match="empty"):
        split_text("  \n", 0.9)


def test_sms_parsing(shared_data):
    f = shared_data / "SMSSpamCollection"
    assert len(read_sms_spam(f, book_quoting=True)) == 5572
    rows = read_sms_spam(f)
    assert len(rows) == 5574 and sum(y for _, y in rows) == 747


def test_book_split_reproduces_the_book(shared_data):
    s = book_spam_splits(shared_data / "SMSSpamCollection")
    assert (len(s.train), len(s.val), len(s.test)) == (1045, 149, 300)
    everything = s.train + s.val + s.test
    assert sum(y for _, y in everything) == 747 and len(everything) == 1494
    # the book's first training example (seed 123 sampling and shuffle)
    again = book_spam_splits(shared_data / "SMSSpamCollection")
    assert again == s


def test_full_split_is_stratified_and_disjoint(shared_data):
    s = full_spam_splits(shared_data / "SMSSpamCollection")
    assert len(s.train) + len(s.val) + len(s.test) == 5574
    for part in (s.train, s.val, s.test):
        share = sum(y for _, y in part) / len(part)
        assert 0.12 < share < 0.15
    ids = lambda rows: {id(r) for r in rows}  # noqa: E731
    assert not ids(s.train) & ids(s.test)


def test_bad_sms_file_is_named(tmp_path):
    f = tmp_path / "sms"
    f.write_text("ham\thello\nmaybe\tbroken\n")
    with pytest.raises(DataError, match="row 2 is not 'ham|spam<TAB>text'"):
        read_sms_spam(f)


def test_classification_collate_right_pads_and_keeps_lengths(tok):
    ds = ClassificationDataset([("hello there", 0), ("win a prize now!!!", 1), ("", 0)], tok, max_length=4)
    batch = classification_collate([ds[i] for i in range(3)])
    assert batch["lengths"].tolist() == [2, 4, 1]
    assert batch["input_ids"].shape == (3, 4)
    assert batch["input_ids"][0, 2:].tolist() == [EOT_ID, EOT_ID]
    assert batch["labels"].tolist() == [0, 1, 0]
    fixed = classification_collate([ds[0]], pad_to=10)
    assert fixed["input_ids"].shape == (1, 10)


def test_instruction_format_and_split(shared_data):
    data = read_instructions(shared_data / "instruction-data.json")
    assert len(data) == 1100
    parts = split_instructions(data, seed=123)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [935, 55, 110]
    entry = {"instruction": "Do X.", "input": "Y", "output": "Z"}
    assert format_prompt(entry).endswith("### Instruction:\nDo X.\n\n### Input:\nY")
    assert "### Input" not in format_prompt({**entry, "input": ""})


def test_instruction_collate_masks_exactly_the_expected_positions():
    items = [{"input_ids": [1, 2, 3, 4, 5], "prompt_len": 3}, {"input_ids": [6, 7], "prompt_len": 1}]
    b = instruction_collate(items, pad_id=50256)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 50256, 50256, 50256]]
    # the first end token stays a target; later padding is -100
    assert b["targets"].tolist() == [[2, 3, 4, 5, 50256], [7, 50256, -100, -100, -100]]
    m = instruction_collate(items, pad_id=50256, mask_prompt=True)
    # targets 0..prompt_len-2 predict prompt tokens
    assert m["targets"].tolist() == [[-100, -100, 4, 5, 50256], [7, 50256, -100, -100, -100]]
    t = instruction_collate(items, pad_id=50256, allowed_max_length=3)
    assert t["input_ids"].shape == (2, 3)


def test_instruction_dataset_tokens(tok):
    ds = InstructionDataset([{"instruction": "Say hi.", "input": "", "output": "Hi."}], tok)
    item = ds[0]
    assert tok.decode(item["input_ids"][: item["prompt_len"]]).endswith("Say hi.")
    assert tok.decode(item["input_ids"]).endswith("### Response:\nHi.")


def test_bad_instruction_file(tmp_path):
    f = tmp_path / "i.json"
    f.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(DataError, match=r"record 0 lacks key\(s\) \['output'\]"):
        read_instructions(f)
    f.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_instructions(f)


def test_special_token_text_in_a_message_is_plain_text(tok):
    ds = ClassificationDataset([("a <|endoftext|> b", 1)], tok, max_length=32)
    assert EOT_ID not in ds[0]["input_ids"]
    assert tok.decode(ds[0]["input_ids"]) == "a <|endoftext|> b"

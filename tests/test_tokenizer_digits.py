"""prepare.tokenizer=gpt2-digits: GPT-2's BPE with every ASCII digit its own token, from
the tokenizer itself through prepare, pretrain, finetune_spam and the ONNX export that
serving runs (real stages on the tiny profile, real onnxruntime)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from gptpkg.cli import main
from gptpkg.config import load_params
from gptpkg.data import read_sms_spam
from gptpkg.tokenizer import TOKENIZERS, UnknownTokenizer, get_tokenizer, tokenizer_of
from helpers import prepared_tiny_workspace

DIGITS = re.compile(rb"[0-9]")


@pytest.fixture(scope="module")
def gpt2(_offline_env):
    return get_tokenizer()


@pytest.fixture(scope="module")
def digits(_offline_env):
    return get_tokenizer(name="gpt2-digits")


def pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


def test_numbers_become_single_digits_the_first_with_its_space(gpt2, digits):
    text = "Call 09061701461 now, txt WIN to 87121. £1000 prize 2nd"
    assert pieces(gpt2, gpt2.encode_ordinary(text))[1:6] == [" 09", "06", "17", "01", "461"]  # what BPE does
    assert pieces(digits, digits.encode_ordinary(text)) == [
        "Call", " 0", "9", "0", "6", "1", "7", "0", "1", "4", "6", "1", " now", ",", " t", "xt", " WIN", " to",
        " 8", "7", "1", "2", "1", ".", " £", "1", "0", "0", "0", " prize", " 2", "nd"]
    assert digits.name == "gpt2-digits" and gpt2.name == "gpt2"
    assert digits.n_vocab == gpt2.n_vocab == 50257 and digits.eot_token == 50256


def test_every_sms_round_trips_and_only_digits_change(gpt2, digits, shared_data):
    messages = [t for t, _ in read_sms_spam(shared_data / "SMSSpamCollection")]
    assert len(messages) == 5574
    changed = 0
    for text in messages:
        ids, base = digits.encode_ordinary(text), gpt2.encode_ordinary(text)
        assert digits.decode(ids) == text  # lossless, byte for byte
        for i in ids:  # no token holds two ASCII digits
            assert len(DIGITS.findall(gpt2.decode_single_token_bytes(i))) <= 1
        # the tokens without digits are GPT-2's own, in the same order
        assert [i for i in ids if not DIGITS.search(gpt2.decode_single_token_bytes(i))] == \
               [i for i in base if not DIGITS.search(gpt2.decode_single_token_bytes(i))]
        if not DIGITS.search(text.encode()):
            assert ids == base
        changed += ids != base
    assert 600 < changed < 1500  # messages with a multi-digit number (most spam, few ham)


def test_special_tokens_and_unknown_names(gpt2, digits):
    ids = digits.encode("a <|endoftext|> 12", allowed_special={"<|endoftext|>"})
    assert ids == gpt2.encode("a <|endoftext|>", allowed_special={"<|endoftext|>"}) + pieces_ids(gpt2, [" 1", "2"])
    assert digits.encode_ordinary("<|endoftext|>") == gpt2.encode_ordinary("<|endoftext|>")  # plain text there
    with pytest.raises(UnknownTokenizer, match=r"tokenizer: expected a tokenizer in \['gpt2', 'gpt2-digits'\], got 'bpe'"):
        get_tokenizer(name="bpe")
    assert TOKENIZERS == ("gpt2", "gpt2-digits")
    assert tokenizer_of({"meta": {"tokenizer": "gpt2-digits"}}) == "gpt2-digits"
    assert tokenizer_of({"meta": {}}) == tokenizer_of({}) == "gpt2"  # checkpoints from before the key


def pieces_ids(tok, texts):
    return [tok.encode_single_token(t.encode()) for t in texts]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_tiny_workspace(tmp_path_factory.mktemp("digits"))


def test_the_pipeline_carries_the_tokenizer_from_corpus_to_onnx(prepared, monkeypatch, capsys, digits, gpt2):
    from gptpkg.onnx_classifier import FP32_FILE, OnnxSpamClassifier

    monkeypatch.chdir(prepared)
    corpus = Path("data/processed/corpus")
    assert json.loads((corpus / "tokenizer.json").read_text()) == {"tokenizer": "gpt2"}
    gpt2_arrays = {f.name: np.load(f) for f in sorted(corpus.glob("*.npy"))}

    # a bad value names the key and the choices, and the prepared data stays as it was
    assert main(["prepare", "--no-progress", "--set", "prepare.tokenizer=digits"]) == 1
    assert "params.prepare.tokenizer: expected one of ['gpt2', 'gpt2-digits'], got 'digits'" in capsys.readouterr().err
    assert json.loads((corpus / "tokenizer.json").read_text()) == {"tokenizer": "gpt2"}
    assert all(np.array_equal(np.load(corpus / n), a) for n, a in gpt2_arrays.items())

    tok_set = ["--set", "prepare.tokenizer=gpt2-digits"]
    assert main(["prepare", "--no-progress", *tok_set]) == 0
    assert json.loads((corpus / "tokenizer.json").read_text()) == {"tokenizer": "gpt2-digits"}
    assert json.loads(Path("metrics/prepare.json").read_text())["tokenizer"] == "gpt2-digits"
    for name, before in gpt2_arrays.items():  # the same text, its numbers in single digits
        after = np.load(corpus / name)
        assert digits.decode(after.tolist()) == gpt2.decode(before.tolist())
        assert len(after) >= len(before)
        assert all(len(DIGITS.findall(gpt2.decode_single_token_bytes(int(i)))) <= 1 for i in np.unique(after))

    # pretraining records it, the classifier takes it from the pretrained checkpoint
    # (not from params: here params say gpt2 again), the ONNX export and serving from it
    assert main(["pretrain", "--no-progress", "--set", "pretrain.max_steps=2", "--set", "pretrain.eval_every=2"]) == 0
    config = json.loads(Path("models/pretrained/config.json").read_text())
    assert config["meta"]["tokenizer"] == "gpt2-digits"
    import gptpkg.generate

    used = []
    real = gptpkg.generate.generate_text
    monkeypatch.setattr(gptpkg.generate, "generate_text", lambda m, tok, *a, **k: used.append(tok.name) or real(m, tok, *a, **k))
    assert main(["generate", "models/pretrained", "Call 0906", "--max-new-tokens", "3"]) == 0
    assert used == ["gpt2-digits"]  # `gptpkg generate` encodes with the checkpoint's tokenizer
    assert main(["finetune_spam", "--no-progress", "--set", "finetune_spam.max_steps=2",
                 "--set", "finetune_spam.soup=1", "--set", "finetune_spam.eval_every=2"]) == 0
    assert json.loads(Path("models/spam_classifier/config.json").read_text())["meta"]["tokenizer"] == "gpt2-digits"
    assert main(["export_onnx", "--no-progress", "--set", "export_onnx.int8=false"]) == 0
    metrics = json.loads(Path("metrics/export_onnx.json").read_text())
    assert metrics["parity_label_mismatches"] == 0
    clf = OnnxSpamClassifier(Path("models/onnx") / FP32_FILE, device="cpu")
    assert clf.meta.tokenizer == "gpt2-digits"
    text = "Sorry I missed your call, I'm on 07090201529"
    assert clf.encode(text) == digits.encode_ordinary(text) != gpt2.encode_ordinary(text)

    # a checkpoint naming an unknown tokenizer is refused by name, before any training
    bad = copy.deepcopy(config)
    bad["meta"]["tokenizer"] = "bpe"
    Path("models/pretrained/config.json").write_text(json.dumps(bad))
    before = Path("models/spam_classifier/model.safetensors").read_bytes()
    assert main(["finetune_spam", "--no-progress", "--set", "finetune_spam.max_steps=2",
                 "--set", "finetune_spam.soup=1"]) == 1
    assert "meta.tokenizer: expected a tokenizer in ['gpt2', 'gpt2-digits'], got 'bpe'" in capsys.readouterr().err
    assert Path("models/spam_classifier/model.safetensors").read_bytes() == before
    Path("models/pretrained/config.json").write_text(json.dumps(config))


def test_onnx_metadata_with_an_unknown_tokenizer_is_refused(tiny_onnx_export, tmp_path):
    import onnx

    from gptpkg.onnx_classifier import FP32_FILE, ModelUnavailable, OnnxSpamClassifier

    params, _ = tiny_onnx_export
    proto = onnx.load(str(Path(params["paths"]["onnx"]) / FP32_FILE))
    for p in proto.metadata_props:
        if p.key == "gptpkg.tokenizer":
            p.value = "bpe"
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelUnavailable, match=r"tokenizer 'bpe' unsupported \(expected one of \['gpt2', 'gpt2-digits'\]\)"):
        OnnxSpamClassifier(tmp_path / "model.onnx", device="cpu")


def test_params_default_and_choices_are_documented():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params["prepare"]["tokenizer"] in TOKENIZERS

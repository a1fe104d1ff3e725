"""finetune_spam.framing: how a classifier frames each message's tokens
(`tokenizer.encode_message`), the one rule training, export and serving share. The real
stage on a tiny model, the real export and onnxruntime."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from gptpkg.config import load_params
from gptpkg.stages import fetch, paths_of, prepare, read_spam_split
from gptpkg.tokenizer import EOT_ID, FRAMINGS, encode_message

ROOT = Path(__file__).resolve().parents[1]
TEXT = "WINNER!! Call 09061701461 to claim your prize <|endoftext|> now"


def test_plain_and_eot_framing(tok):
    ids = tok.encode_ordinary(TEXT)
    assert EOT_ID not in ids  # a literal "<|endoftext|>" in a message is plain text
    assert encode_message(tok, TEXT, 128) == encode_message(tok, TEXT, 128, "plain") == ids
    assert encode_message(tok, TEXT, 5) == ids[:5]
    assert encode_message(tok, TEXT, 128, "eot") == [EOT_ID, *ids, EOT_ID]
    cut = encode_message(tok, TEXT, 5, "eot")  # the frame stays, the message is cut
    assert cut == [EOT_ID, *ids[:3], EOT_ID] and len(cut) == 5
    assert encode_message(tok, "", 128) == [EOT_ID]
    assert encode_message(tok, "", 128, "eot") == [EOT_ID, EOT_ID]
    with pytest.raises(ValueError, match=r"framing expected one of \['plain', 'eot'\], got 'bos'"):
        encode_message(tok, TEXT, 128, "bos")
    with pytest.raises(ValueError, match="framing 'eot' needs max_length >= 3, got 2"):
        encode_message(tok, TEXT, 2, "eot")


@pytest.fixture(scope="module")
def real(_offline_env, tmp_path_factory) -> dict:
    """params whose fetch and prepare stages ran on the real data (the mirror)."""
    work = tmp_path_factory.mktemp("framing-real")
    params = load_params(ROOT / "params.yaml", [f"paths.{k}={work / k}" for k in ("raw", "processed", "metrics")])
    fetch(params)
    prepare(params)
    return params


def test_the_sms_pretraining_corpus_frames_messages_so(real):
    """The lever's premise: prepare joins the SMS messages with <|endoftext|>, so inside
    the corpus every message is eot-framed."""
    ids = np.load(Path(real["paths"]["processed"]) / "corpus" / "sms.train.npy")
    eots = np.flatnonzero(ids == EOT_ID)
    assert len(eots) > 4000  # one between every two of the ~5,000 messages
    first = [int(t) for t in ids[eots[10]: eots[11] + 1]]
    assert first[0] == first[-1] == EOT_ID and EOT_ID not in first[1:-1]


@pytest.fixture(scope="module")
def tiny_spam(real, tmp_path_factory):
    """A handful of real messages as the spam splits, and params for a tiny scratch
    classifier whose outputs go under the module's temp dir."""
    work = tmp_path_factory.mktemp("framing")
    base, real = real, paths_of(real)
    spam_dir = work / "processed" / "spam"
    spam_dir.mkdir(parents=True)
    for part, n in (("train", 12), ("val", 4), ("test", 20)):
        rows = read_spam_split(real, part)
        rows = [r for r in rows if r[1] == 0][:n // 2] + [r for r in rows if r[1] == 1][:n // 2]
        (spam_dir / f"{part}.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n",
                                                 encoding="utf-8")
    (spam_dir / "all.jsonl").write_text("".join((spam_dir / f"{p}.jsonl").read_text(encoding="utf-8")
                                                for p in ("train", "val", "test")), encoding="utf-8")

    def params(out: str, **keys) -> dict:
        over = [f"paths.processed={work / 'processed'}", "wandb.mode=disabled", f"data.mirror={base['data']['mirror']}",
                *[f"paths.{k}={work / out / k}" for k in ("spam_classifier", "onnx", "metrics", "plots", "wandb")],
                "finetune_spam.init=scratch", "finetune_spam.model=tiny", "finetune_spam.max_length=24",
                "finetune_spam.train_data=book", "finetune_spam.epochs=1.0", "finetune_spam.max_steps=3",
                "finetune_spam.batch_size=4", "finetune_spam.warmup_steps=1", "finetune_spam.eval_every=0",
                "finetune_spam.soup=1", "export_onnx.int8=false",
                *[f"finetune_spam.{k}={v}" for k, v in keys.items()]]
        return load_params(ROOT / "params.yaml", over)

    return params


def test_eot_framed_classifier_trains_exports_and_serves_with_the_same_ids(tiny_spam, tok):
    from gptpkg.data import ClassificationDataset
    from gptpkg.export import run as export
    from gptpkg.onnx_classifier import FP32_FILE, OnnxSpamClassifier
    from gptpkg.runner import run_stage

    p = tiny_spam("eot", framing="eot")
    run_stage("finetune_spam", p, progress=False)
    trained = json.loads((Path(p["paths"]["metrics"]) / "finetune_spam.json").read_text())
    config = json.loads((Path(p["paths"]["spam_classifier"]) / "config.json").read_text())
    assert config["meta"]["framing"] == "eot"
    m = export(p)
    assert m["parity_label_mismatches"] == 0
    # the ONNX model decides the test split exactly as the trained model did
    assert m["fp32_test_accuracy"] == trained["test_accuracy"]
    assert m["fp32_test_confusion"] == trained["test_confusion"]
    clf = OnnxSpamClassifier(Path(p["paths"]["onnx"]) / FP32_FILE, device="cpu")
    assert clf.meta.framing == "eot"
    test = read_spam_split(paths_of(p), "test")
    assert [clf.encode(t) for t, _ in test] == ClassificationDataset(test, tok, 24, "eot").ids
    assert clf.encode(TEXT)[0] == clf.encode(TEXT)[-1] == EOT_ID


def test_onnx_framing_metadata_old_and_unknown(tiny_onnx_export, tmp_path):
    from gptpkg.onnx_classifier import FP32_FILE, ModelUnavailable, OnnxSpamClassifier

    params, _ = tiny_onnx_export
    proto = onnx.load(str(Path(params["paths"]["onnx"]) / FP32_FILE))
    assert {p.key: p.value for p in proto.metadata_props}["gptpkg.framing"] == "plain"
    old = copy.deepcopy(proto)  # exported before framing was recorded: plain
    kept = [p for p in old.metadata_props if p.key != "gptpkg.framing"]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert OnnxSpamClassifier(tmp_path / "old.onnx", device="cpu").meta.framing == "plain"
    def save_with(name: str, **values: str) -> Path:
        bad = copy.deepcopy(proto)
        for p in bad.metadata_props:
            if p.key.removeprefix("gptpkg.") in values:
                p.value = values[p.key.removeprefix("gptpkg.")]
        onnx.save(bad, str(tmp_path / name))
        return tmp_path / name

    with pytest.raises(ModelUnavailable, match=r"framing 'bos' unsupported \(expected one of \['plain', 'eot'\]\)"):
        OnnxSpamClassifier(save_with("bad.onnx", framing="bos"), device="cpu")
    with pytest.raises(ModelUnavailable, match=r"max_length 2 not in 3..\d+ \(framing eot\)"):
        OnnxSpamClassifier(save_with("short.onnx", framing="eot", max_length="2"), device="cpu")
    assert OnnxSpamClassifier(save_with("plain2.onnx", max_length="2"), device="cpu").meta.max_length == 2


def test_params_default_is_documented():
    params = load_params(ROOT / "params.yaml")
    assert params["finetune_spam"]["framing"] == "plain" and params["finetune_spam"]["framing"] in FRAMINGS
    assert "- finetune_spam.framing\n" in (ROOT / "dvc.yaml").read_text()

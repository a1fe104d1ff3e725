"""export_onnx and package: real torch.onnx export, real onnxruntime, real BentoML store."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import params_in

from gptpkg.checkpoint import load_checkpoint, save_checkpoint
from gptpkg.config import ConfigError, ExportConfig
from gptpkg.onnx_classifier import FP32_FILE, INT8_FILE, META_KEYS, ModelUnavailable, OnnxSpamClassifier
from gptpkg.onnx_export import ExportError, quantize_int8

ROOT = Path(__file__).resolve().parents[1]


def _export(params):
    """The export_onnx stage function itself, on `params` (metrics returned, not written)."""
    from gptpkg.pipeline import StageContext
    from gptpkg.stages.export_onnx import run

    return run(params.export_onnx, StageContext(paths=params.paths, data_mirror=params.data.mirror, progress=False))


def _with(params, section: str, **keys):
    """`params` with some keys of one section changed (every rule checked again)."""
    return params.replace(**{section: getattr(params, section).replace(**keys)})


def test_parity_on_the_test_split(tiny_onnx_export):
    _, m = tiny_onnx_export
    assert m["test_n"] == 60
    assert m["parity_label_mismatches"] == 0
    assert 0.0 <= m["parity_max_abs_logit_diff"] <= 1e-4
    assert m["fp32_test_accuracy"] == m["torch_test_accuracy"]
    assert m["opset"] >= 17


def test_the_file_does_not_depend_on_where_the_code_lives(tiny_onnx_export):
    """No source location in the graph: the same weights give the same bytes (and so the
    same sha256 and BentoML tag) from any checkout."""
    params, _ = tiny_onnx_export
    model = onnx.load(str(Path(params.paths.onnx) / FP32_FILE))
    texts = [p.value for n in model.graph.node for p in n.metadata_props]
    assert texts, "the exporter's node metadata (module scopes) is expected to stay"
    assert not [v for v in texts if str(ROOT) in v or "site-packages" in v]


def test_dynamic_batch_and_length_match_torch(tiny_onnx_export):
    params, _ = tiny_onnx_export
    model, _ = load_checkpoint(params.paths.spam_classifier)
    clf = OnnxSpamClassifier(Path(params.paths.onnx) / FP32_FILE, device="cpu")
    g = torch.Generator().manual_seed(1)
    for B, T in [(1, 1), (7, 50), (3, model.cfg.context_length)]:
        ids = torch.randint(0, 50257, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        with torch.no_grad():
            ref = model.eval()(ids, lengths).numpy()
        got = clf.logits(ids.numpy(), lengths.numpy())
        assert got.shape == (B, 2)
        assert np.abs(got - ref).max() <= 1e-4


def test_metadata_and_graph_inputs(tiny_onnx_export):
    params, _ = tiny_onnx_export
    folder = Path(params.paths.onnx)
    proto = onnx.load(str(folder / FP32_FILE))
    props = {p.key: p.value for p in proto.metadata_props}
    assert {k for k in props if k.startswith("gptpkg.")} == set(META_KEYS)
    assert json.loads(props["gptpkg.labels"]) == ["ham", "spam"]
    assert (props["gptpkg.max_length"], props["gptpkg.pad_id"], props["gptpkg.context_length"]) == (
        "32",
        "50256",
        "128",
    )
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert all(isinstance(d, str) for d in dims["input_ids"]) and isinstance(dims["lengths"][0], str)
    assert not list(folder.glob("*.data")), "weights must be inside the single ONNX file"
    assert (folder / "gpt2" / "vocab.bpe").is_file() and (folder / "gpt2" / "encoder.json").is_file()


def test_padding_does_not_change_a_result(tiny_onnx_export):
    params, _ = tiny_onnx_export
    clf = OnnxSpamClassifier(Path(params.paths.onnx) / FP32_FILE, device="cpu")
    texts = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "ok", "", "x " * 500]
    alone = [clf.predict([t])[0] for t in texts]
    together = clf.predict(texts)
    for a, b in zip(alone, together):
        assert a["label"] == b["label"]
        assert abs(a["spam_probability"] - b["spam_probability"]) < 1e-6
    assert len(clf.encode("x " * 500)) == 32  # cut to max_length, as in training


def test_int8_gate_keeps_or_drops(tiny_onnx_export, tmp_path):
    params, _ = tiny_onnx_export
    src = Path(params.paths.onnx)
    (tmp_path / FP32_FILE).write_bytes((src / FP32_FILE).read_bytes())
    clf = OnnxSpamClassifier(tmp_path / FP32_FILE, device="cpu")
    ids = [clf.encode(t) for t in ["win cash now", "see you", "call 0800 now", "ok lol"] * 5]
    y = [1 - int(k) for k in clf.logits_of_ids(ids).argmax(1)]  # truth = the opposite of fp32's answers
    cfg = ExportConfig(opset=18, parity_atol=1e-4, batch_size=8, int8=True, int8_max_drop=0.5, min_test_accuracy=0.0)
    # Against an fp32 accuracy of 1.0, int8 (close to fp32, so close to 0 here) fails the gate.
    dropped = quantize_int8(tmp_path, ids, y, 1.0, cfg)
    assert dropped["int8_kept"] is False, dropped
    assert not (tmp_path / INT8_FILE).exists()
    assert dropped["int8_accuracy_drop_points"] > 0.5
    # Against its own accuracy the drop is 0: kept, and the metadata survives quantization.
    kept = quantize_int8(tmp_path, ids, y, dropped["int8_test_accuracy"], cfg)
    assert kept["int8_kept"] is True and kept["int8_accuracy_drop_points"] == 0
    assert OnnxSpamClassifier(tmp_path / INT8_FILE, device="cpu").meta == clf.meta


def test_failed_parity_writes_nothing(tiny_onnx_export, monkeypatch):
    params, _ = tiny_onnx_export
    onnx_file = Path(params.paths.onnx) / FP32_FILE
    before = onnx_file.read_bytes()
    import gptpkg.stages.export_onnx as export

    real = export.export_classifier

    def export_a_different_model(model, meta, out, opset):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.bias += 1.0  # logits shift: parity must catch it
        real(other, meta, out, opset)

    monkeypatch.setattr(export, "export_classifier", export_a_different_model)
    with pytest.raises(ExportError, match="fails parity"):
        _export(_with(params, "export_onnx", int8=False))
    assert onnx_file.read_bytes() == before
    assert not [f for f in onnx_file.parent.parent.iterdir() if f.name.startswith(".onnx.tmp")]


def test_a_classifier_below_the_floor_is_not_exported(tiny_onnx_export):
    """The quality gate: below export_onnx.min_test_accuracy the stage refuses, naming the key,
    and the previous export stays."""
    params, metrics = tiny_onnx_export
    onnx_file = Path(params.paths.onnx) / FP32_FILE
    before = onnx_file.read_bytes()
    floor = min(1.0, metrics["torch_test_accuracy"] + 0.01)
    with pytest.raises(ExportError, match=r"below params.export_onnx.min_test_accuracy .*; not exported"):
        _export(_with(params, "export_onnx", int8=False, min_test_accuracy=floor))
    assert onnx_file.read_bytes() == before
    with pytest.raises(ConfigError, match=r"params.export_onnx.min_test_accuracy: expected a fraction in \[0, 1\]"):
        params_in(Path(params.paths.onnx).parent, "export_onnx.min_test_accuracy=80")


def test_bad_inputs_are_named(tiny_onnx_export, tmp_path):
    params, _ = tiny_onnx_export
    with pytest.raises(ConfigError, match=r"params.export_onnx.opset: expected an ONNX opset >= 17, got 13"):
        params_in(tmp_path, "export_onnx.opset=13")
    from gptpkg.model import GPT
    from gptpkg.presets import model_config

    lm = tmp_path / "lm"
    save_checkpoint(lm, GPT(model_config("tiny")))
    with pytest.raises(ExportError, match="not a fine-tuned classifier"):
        _export(_with(params, "paths", spam_classifier=str(lm)))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelUnavailable, match="unreadable"):
        OnnxSpamClassifier(bad)


def _gptpkg(args, params, tmp_path, home):
    pfile = tmp_path / "params.yaml"
    import yaml

    pfile.write_text(yaml.safe_dump(params.model_dump()))
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", *args, "--params", str(pfile)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_package_into_bentoml_store(tiny_onnx_export, tmp_path):
    params, _ = tiny_onnx_export
    home = tmp_path / "bentoml"
    first = _gptpkg(["package"], params, tmp_path, home)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout[first.stdout.index("{") :])
    name, version = out["bento_model"].split(":")
    assert name == "gptpkg-spam-classifier" and version.startswith("fp32-") and out["created"] is True
    stored = home / "models" / name / version
    assert (stored / FP32_FILE).read_bytes() == (Path(params.paths.onnx) / FP32_FILE).read_bytes()
    assert (stored / "gpt2" / "vocab.bpe").is_file()
    again = json.loads((r := _gptpkg(["package"], params, tmp_path, home)).stdout[r.stdout.index("{") :])
    assert again["bento_model"] == out["bento_model"] and again["created"] is False
    # the stage's DVC output: a record of the store entry, the same bytes on every run
    record_file = Path(params.paths.bento_model)
    record = json.loads(record_file.read_text())
    assert record["bento_model"] == out["bento_model"] and record["sha256"] == out["sha256"]
    before = record_file.read_bytes()
    # a wiped store is noticed when the stage runs: the entry is imported again
    shutil.rmtree(home / "models")
    r = _gptpkg(["package"], params, tmp_path, home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{") :])["created"] is True and (stored / FP32_FILE).is_file()
    assert record_file.read_bytes() == before
    # a store entry whose bytes differ under the same tag is refused, named, and kept
    (stored / FP32_FILE).write_bytes(b"not the exported model")
    r = _gptpkg(["package"], params, tmp_path, home)
    assert r.returncode == 1 and f"bentoml models delete {out['bento_model']}" in r.stderr
    assert (stored / FP32_FILE).read_bytes() == b"not the exported model"
    # int8 only when the gate kept it; a missing file is a named error, not a crash
    p = _with(params, "package", variant="int8")
    if not (Path(params.paths.onnx) / INT8_FILE).exists():
        r = _gptpkg(["package"], p, tmp_path, home)
        assert r.returncode == 1 and "accuracy gate" in r.stderr

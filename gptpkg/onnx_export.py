"""The spam classifier as ONNX: the export, its checks and the int8 copy.

The fine-tuned classifier checkpoint -> one self-contained ONNX file
(`input_ids` (B, T) int64 + `lengths` (B,) int64 -> `logits` (B, n_labels); batch and
sequence length dynamic; the last-real-token pooling inside the graph, as
`GPTClassifier.forward`), with the max length / pad id / labels / context length in its
metadata_props. It is checked against PyTorch on the whole test split (identical labels,
max |Δlogit| within `parity_atol`) before it replaces anything; an int8 dynamic-quantized
copy is kept only when its test accuracy is within `int8_max_drop` points of fp32.
The `export_onnx` stage (gptpkg.stages.export_onnx) runs these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ExportConfig
from .errors import GptpkgError
from .onnx_classifier import FP32_FILE, INT8_FILE, ModelMeta, OnnxSpamClassifier

ONNX_ARTIFACT = "spam-classifier-onnx"  # its W&B artifact name (dvc.yaml `artifacts:` uses the same)


class ExportError(GptpkgError, RuntimeError):
    """The exported model failed a check; nothing was written over the previous export."""


def model_meta(config: dict, where: str) -> ModelMeta:
    """The serving metadata of a classifier checkpoint (its config.json "meta")."""
    meta = config.get("meta") or {}
    missing = [k for k in ("labels", "max_length", "pad_id") if k not in meta]
    if not config.get("n_classes") or missing:
        raise ExportError(
            f"{where}: not a fine-tuned classifier checkpoint (n_classes={config.get('n_classes')}, "
            f"meta lacks {missing}); run finetune_spam first"
        )
    if len(meta["labels"]) != config["n_classes"]:
        raise ExportError(f"{where}: {len(meta['labels'])} labels for {config['n_classes']} classes")
    return ModelMeta(
        max_length=int(meta["max_length"]),
        pad_id=int(meta["pad_id"]),
        labels=tuple(meta["labels"]),
        context_length=int(config["model"]["context_length"]),
    )


def export_classifier(model, meta: ModelMeta, out: Path, opset: int) -> None:
    """Write the classifier `model` (a `GPTClassifier`) as one ONNX file with `meta` in
    its metadata_props. LoRA adapters are merged into their layers first (on a copy): the
    graph is a plain classifier, and the parity check compares it with the adapted model."""
    import copy

    import torch

    from .lora import adapter_of, merge_lora

    if adapter_of(model):
        model = copy.deepcopy(model)
        merge_lora(model)

    class Classify(torch.nn.Module):
        """The classifier with the graph's input names (dynamic_shapes is keyed by them)."""

        def __init__(self, classifier) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.classifier(input_ids, lengths)

    model = model.eval().cpu()
    T = min(8, meta.context_length)
    ids = torch.full((2, T), meta.pad_id, dtype=torch.long)
    lengths = torch.tensor([T, 1], dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    # Up to context_length, so the model's length check is decided at export time.
    seq = torch.export.Dim("seq", min=1, max=meta.context_length)
    with torch.no_grad():
        program = torch.onnx.export(
            Classify(model).eval(),
            (ids, lengths),
            input_names=["input_ids", "lengths"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "lengths": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    # Each node records its source location (absolute file paths, line numbers): dropped,
    # so the file's bytes, its sha256 and its BentoML tag depend on the weights and the
    # code, not on the folder the project was checked out in.
    for node in program.model.graph:
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    program.model.metadata_props.update(meta.to_props())
    program.save(str(out), external_data=False)


def bundle_tokenizer(dest: Path, mirror: str | None) -> None:
    """Write GPT-2's BPE files to dest/gpt2/ (sha256-checked) so the export serves offline."""
    from .files import atomic_write_bytes
    from .tokenizer import BPE_FILES, bpe_file

    for name in BPE_FILES:
        atomic_write_bytes(dest / name, bpe_file(name, mirror))


def torch_logits(model, ids: list[list[int]], pad, batch_size: int):
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x, n = pad(ids[i : i + batch_size])
            out.append(model(torch.from_numpy(x), torch.from_numpy(n)).float().numpy())
    return np.concatenate(out)


def check_accuracy_floor(accuracy: float, n: int, cfg: ExportConfig, paths) -> None:
    """The quality gate: a classifier below `min_test_accuracy` is not exported, so neither
    `dvc repro` nor a Dagster run can package it (the Dagster check reads the same key)."""
    if accuracy < cfg.min_test_accuracy:
        raise ExportError(
            f"{paths.spam_classifier}: test accuracy {accuracy:.4f} on {n} messages is below "
            f"params.export_onnx.min_test_accuracy {cfg.min_test_accuracy}; not exported, "
            f"{paths.onnx} left unchanged"
        )


def without_initializer_shapes(src: Path, out: Path) -> None:
    """Copy `src` to `out` without the value_info entries that restate an initializer's
    shape. torch's exporter writes them; onnxruntime before 1.32 turns the classifier head's
    Gemm into a MatMul by transposing its weight but keeps the stale entry, and its shape
    inference then fails ("Inferred shape and existing shape differ in dimension 0")."""
    import onnx

    model = onnx.load(str(src))
    weights = {t.name for t in model.graph.initializer}
    kept = [vi for vi in model.graph.value_info if vi.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.save(model, str(out))


def write_int8(src: Path, out: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gather weights (activations stay float and
    are quantized per batch at run time); the metadata_props are carried over."""
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ORT logs a hint to pre-process shapes (it matters for static, calibrated
    # quantization only) on the root logger: silenced for this call alone.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            plain = Path(tmp) / src.name
            without_initializer_shapes(src, plain)
            quantize_dynamic(plain, out, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def quantize_int8(
    folder: Path, ids: list[list[int]], y_true: list[int], fp32_accuracy: float, cfg: ExportConfig
) -> dict[str, Any]:
    """Write folder/model.int8.onnx; delete it again unless it passes the accuracy gate."""
    from .metrics import classification_metrics

    out = folder / INT8_FILE
    write_int8(folder / FP32_FILE, out)
    int8 = OnnxSpamClassifier(out, device="cpu")  # also checks the metadata survived
    acc = classification_metrics(y_true, int8.logits_of_ids(ids, cfg.batch_size).argmax(1).tolist(), "test_")
    drop = 100.0 * (fp32_accuracy - acc["test_accuracy"])
    kept = drop <= cfg.int8_max_drop
    result = {"int8_" + k: v for k, v in acc.items()}
    result.update(
        {
            "int8_accuracy_drop_points": round(drop, 4),
            "int8_max_drop": cfg.int8_max_drop,
            "int8_kept": kept,
            "int8_size_mb": round(out.stat().st_size / 2**20, 2),
        }
    )
    if not kept:
        out.unlink()
        print(
            f"export_onnx: int8 variant dropped: test accuracy {acc['test_accuracy']:.4f} is "
            f"{drop:.2f} points below fp32 (allowed {cfg.int8_max_drop})"
        )
    return result

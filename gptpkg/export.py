"""The `export_onnx` and `package` stages.

export_onnx: the fine-tuned classifier checkpoint -> one self-contained ONNX file
(`input_ids` (B, T) int64 + `lengths` (B,) int64 -> `logits` (B, n_labels); batch and
sequence length dynamic; the last-real-token pooling inside the graph, as
`GPTClassifier.forward`), with the max length / pad id / labels / context length in its
metadata_props. It is checked against PyTorch on the whole test split (identical labels,
max |Δlogit| within `parity_atol`) before it replaces anything; an int8 dynamic-quantized
copy is kept only when its test accuracy is within `int8_max_drop` points of fp32.

package: the exported folder into the BentoML model store under a versioned tag (the
version is the first 12 hex digits of the ONNX file's sha256, so the same model gets
the same tag). bentoml is imported there only.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .config import ExportConfig, PackageConfig
from .errors import GptpkgError
from .onnx_classifier import FP32_FILE, INT8_FILE, TOKENIZER_DIR, ModelMeta, OnnxSpamClassifier

ONNX_ARTIFACT = "spam-classifier-onnx"  # its W&B artifact name (dvc.yaml `artifacts:` uses the same)


class ExportError(GptpkgError, RuntimeError):
    """The exported model failed a check; nothing was written over the previous export."""


# ---------------------------------------------------------------------------------
# export


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
    its metadata_props."""
    import torch

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


def run(cfg: ExportConfig, ctx) -> dict[str, Any]:
    import numpy as np

    from .checkpoint import load_checkpoint
    from .fetch import sha256_of
    from .files import atomic_dir
    from .metrics import classification_metrics
    from .prepare import read_spam_split

    paths = ctx.paths
    model, config = load_checkpoint(paths.spam_classifier)
    model.eval()
    meta = model_meta(config, paths.spam_classifier)
    test = read_spam_split(paths, "test")
    y_true = [y for _, y in test]
    metrics: dict[str, Any] = {"opset": cfg.opset, "test_n": len(test)}

    with atomic_dir(paths.onnx) as tmp:
        bundle_tokenizer(tmp, ctx.mirror)
        t0 = time.perf_counter()
        export_classifier(model, meta, tmp / FP32_FILE, cfg.opset)
        metrics["export_s"] = round(time.perf_counter() - t0, 2)
        fp32 = OnnxSpamClassifier(tmp / FP32_FILE, device="cpu")
        ids = [fp32.encode(t) for t, _ in test]
        ref = torch_logits(model, ids, fp32.pad, cfg.batch_size)
        metrics["torch_test_accuracy"] = classification_metrics(y_true, ref.argmax(1).tolist())["accuracy"]
        check_accuracy_floor(metrics["torch_test_accuracy"], len(test), cfg, paths)
        got = fp32.logits_of_ids(ids, cfg.batch_size)
        diff = float(np.abs(got - ref).max())
        mismatches = int((got.argmax(1) != ref.argmax(1)).sum())
        metrics.update(
            {"parity_max_abs_logit_diff": diff, "parity_label_mismatches": mismatches, "parity_atol": cfg.parity_atol}
        )
        if mismatches or not diff <= cfg.parity_atol:  # `not <=` also catches NaN
            raise ExportError(
                f"ONNX export of {paths.spam_classifier} fails parity on the test split: "
                f"{mismatches} labels differ, max |Δlogit| {diff:.3g} > {cfg.parity_atol}; "
                f"{paths.onnx} left unchanged"
            )
        acc = classification_metrics(y_true, got.argmax(1).tolist(), "test_")
        metrics.update({"fp32_" + k: v for k, v in acc.items()})
        metrics["fp32_size_mb"] = round((tmp / FP32_FILE).stat().st_size / 2**20, 2)
        if cfg.int8:
            metrics.update(quantize_int8(tmp, ids, y_true, acc["test_accuracy"], cfg))
    metrics["fp32_sha256"] = sha256_of(Path(paths.onnx) / FP32_FILE)
    # W&B (when the runner opened a run): the folder the service runs, as a model artifact
    # whose alias is the BentoML tag version `package` gives the fp32 file
    ctx.logger.log_artifact(
        paths.onnx,
        ONNX_ARTIFACT,
        "model",
        aliases=[f"fp32-{metrics['fp32_sha256'][:12]}"],
        metadata={k: v for k, v in metrics.items() if k != "export_s"},
    )
    return metrics


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


# ---------------------------------------------------------------------------------
# package


def package(cfg: PackageConfig, ctx) -> dict[str, Any]:
    """Import the exported folder into the BentoML model store, or check the entry that
    is there; write its record (tag, sha256, metadata) to `paths.bento_model`. The record
    is the stage's DVC output: DVC sees the workspace, not the store, so this stage is
    where a wiped store is noticed (the entry is imported again) and a store entry with
    other bytes under the same tag is refused."""
    try:
        import bentoml  # only here: the core library does not depend on bentoml
    except ImportError:
        raise ExportError("the package stage needs BentoML: pip install 'gptpkg[serving]'") from None

    from .fetch import sha256_of
    from .files import write_json

    folder = Path(ctx.paths.onnx)
    onnx_file = folder / (FP32_FILE if cfg.variant == "fp32" else INT8_FILE)
    if not onnx_file.is_file():
        hint = " (the int8 copy is kept only when it passes the accuracy gate)" if cfg.variant == "int8" else ""
        raise ExportError(f"{onnx_file} missing: run export_onnx first{hint}")
    clf = OnnxSpamClassifier(onnx_file, device="cpu")  # refuse to package an unreadable model
    digest = sha256_of(onnx_file)
    tag = f"{cfg.model_name}:{cfg.variant}-{digest[:12]}"
    info = {
        "onnx_file": onnx_file.name,
        "sha256": digest,
        "variant": cfg.variant,
        **{k.removeprefix("gptpkg."): v for k, v in clf.meta.to_props().items()},
    }
    try:
        stored = bentoml.models.get(tag)
        created = False
    except bentoml.exceptions.NotFound:
        with bentoml.models.create(tag, labels={"framework": "onnx", "variant": cfg.variant}, metadata=info) as m:
            shutil.copyfile(onnx_file, Path(m.path) / onnx_file.name)
            shutil.copytree(folder / TOKENIZER_DIR, Path(m.path) / TOKENIZER_DIR)
        stored = bentoml.models.get(tag)
        created = True
    in_store = Path(stored.path) / onnx_file.name
    if not in_store.is_file() or sha256_of(in_store) != digest:
        raise ExportError(
            f"BentoML model {tag}: {in_store} is missing or differs from {onnx_file} (sha256 {digest[:12]}…); "
            f"remove the entry with `bentoml models delete {tag}` and run package again"
        )
    write_json(Path(ctx.paths.bento_model), {"bento_model": str(stored.tag), **info})
    return {"bento_model": str(stored.tag), "created": created, **info}

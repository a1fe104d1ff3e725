"""The `export_onnx` stage: the fine-tuned spam classifier to ONNX, checked against
PyTorch on the whole test split before it replaces the previous export (gptpkg.onnx_export
holds the export and its checks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import ExportConfig
from ..onnx_classifier import FP32_FILE, OnnxSpamClassifier
from ..onnx_export import (
    ONNX_ARTIFACT,
    ExportError,
    bundle_tokenizer,
    check_accuracy_floor,
    export_classifier,
    model_meta,
    quantize_int8,
    torch_logits,
)


def run(cfg: ExportConfig, ctx) -> dict[str, Any]:
    import numpy as np

    from ..checkpoint import load_checkpoint
    from ..files import atomic_dir
    from ..metrics import classification_metrics
    from ..prepared import read_spam_split
    from ..raw import sha256_of

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

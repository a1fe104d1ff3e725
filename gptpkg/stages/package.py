"""The `package` stage: the exported folder into the BentoML model store under a
versioned tag (the version is the first 12 hex digits of the ONNX file's sha256, so the
same model gets the same tag). bentoml is imported here only."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import PackageConfig
from ..onnx_classifier import FP32_FILE, INT8_FILE, TOKENIZER_DIR, OnnxSpamClassifier
from ..onnx_export import ExportError


def run(cfg: PackageConfig, ctx) -> dict[str, Any]:
    """Import the exported folder into the BentoML model store, or check the entry that
    is there; write its record (tag, sha256, metadata) to `paths.bento_model`. The record
    is the stage's DVC output: DVC sees the workspace, not the store, so this stage is
    where a wiped store is noticed (the entry is imported again) and a store entry with
    other bytes under the same tag is refused."""
    try:
        import bentoml  # only here: the core library does not depend on bentoml
    except ImportError:
        raise ExportError("the package stage needs BentoML: pip install 'gptpkg[serving]'") from None

    from ..files import write_json
    from ..raw import sha256_of

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

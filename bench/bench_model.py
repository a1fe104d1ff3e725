"""A spam classifier of the default pipeline size, exported for the benchmarks.

`--checkpoint` takes a trained classifier (e.g. models/spam_classifier); without it a
fresh `GPTClassifier(GPT(model_config("cpu-mini")), 2)` is used: speed does not depend on
the weights. Exported with the same functions as the `export_onnx` stage.
"""

from __future__ import annotations

from pathlib import Path

from gptpkg.onnx_classifier import FP32_FILE, INT8_FILE


def sms_texts(n: int) -> list[str]:
    """The first n SMS messages of the offline mirror (real lengths: ~20 tokens median)."""
    from gptpkg.data import read_sms_spam
    from gptpkg.raw import mirror_dir

    mirror = mirror_dir()
    if mirror is None:
        raise SystemExit("set GPTPKG_DATA_MIRROR to the data mirror (e.g. ../shared/data)")
    return [t for t, _ in read_sms_spam(mirror / "SMSSpamCollection")[:n]]


def build(folder: Path, checkpoint: str | None = None, preset: str = "cpu-mini", max_length: int = 128):
    """(torch model, folder with model.onnx + model.int8.onnx + gpt2/)."""
    import torch

    from gptpkg.checkpoint import load_checkpoint
    from gptpkg.model import GPT, GPTClassifier
    from gptpkg.onnx_export import bundle_tokenizer, export_classifier, model_meta, write_int8
    from gptpkg.presets import model_config

    if checkpoint:
        model, config = load_checkpoint(checkpoint)
    else:
        torch.manual_seed(123)
        model = GPTClassifier(GPT(model_config(preset)), 2)
        config = {
            "n_classes": 2,
            "model": {"context_length": model.cfg.context_length},
            "meta": {"labels": ["ham", "spam"], "max_length": max_length, "pad_id": 50256},
        }
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / FP32_FILE).is_file():
        if not (folder / "gpt2").is_dir():
            bundle_tokenizer(folder, None)
        export_classifier(model, model_meta(config, checkpoint or preset), folder / FP32_FILE, 18)
        write_int8(folder / FP32_FILE, folder / INT8_FILE)
    return model, folder

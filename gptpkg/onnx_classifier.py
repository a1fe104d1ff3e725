"""The exported spam classifier run by ONNX Runtime: read the model's metadata,
tokenize, right-pad, run, softmax. No torch imported here: the HTTP service, the
export check and the benchmarks all use this one class.

An exported model is a folder (`paths.onnx`):

    model.onnx         fp32 graph: input_ids (B, T) int64, lengths (B,) int64 -> logits (B, n_labels)
    model.int8.onnx    dynamic-quantized variant (only when it passed the accuracy gate)
    gpt2/vocab.bpe, gpt2/encoder.json   tiktoken's GPT-2 BPE files, so serving needs no network

Every ONNX file carries in its `metadata_props` what a server needs (`META_KEYS`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GptpkgError
from .tokenizer import encode_message

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_DIR = "gpt2"  # laid out like the offline mirror: <dir>/gpt2/{vocab.bpe,encoder.json}
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
META_KEYS = ("gptpkg.max_length", "gptpkg.pad_id", "gptpkg.labels", "gptpkg.context_length")


class ModelUnavailable(GptpkgError, RuntimeError):
    """The ONNX model file is missing, unreadable or lacks gptpkg's metadata."""


@dataclass(frozen=True)
class ModelMeta:
    max_length: int  # texts are cut to their first `max_length` tokens, as in training
    pad_id: int
    labels: tuple[str, ...]
    context_length: int

    def to_props(self) -> dict[str, str]:
        """The ONNX metadata_props (all values strings)."""
        return {
            "gptpkg.max_length": str(self.max_length),
            "gptpkg.pad_id": str(self.pad_id),
            "gptpkg.labels": json.dumps(list(self.labels)),
            "gptpkg.context_length": str(self.context_length),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], where: str) -> ModelMeta:
        missing = [k for k in META_KEYS if k not in props]
        if missing:
            raise ModelUnavailable(f"{where}: ONNX metadata lacks {missing}; was it written by `gptpkg export_onnx`?")
        try:
            meta = cls(
                max_length=int(props["gptpkg.max_length"]),
                pad_id=int(props["gptpkg.pad_id"]),
                labels=tuple(json.loads(props["gptpkg.labels"])),
                context_length=int(props["gptpkg.context_length"]),
            )
        except (ValueError, TypeError) as e:
            raise ModelUnavailable(f"{where}: bad gptpkg metadata {props}: {e}") from None
        if not 1 <= meta.max_length <= meta.context_length:
            raise ModelUnavailable(f"{where}: max_length {meta.max_length} not in 1..{meta.context_length}")
        return meta


def choose_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """CUDA first when onnxruntime has it (device auto|cuda), always CPU as fallback.
    `available`: the providers onnxruntime offers (default: this install's)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda, got {device!r}")
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ModelUnavailable(f"device=cuda but onnxruntime has only {list(available)} (install onnxruntime-gpu)")
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def length_chunks(lengths: Sequence[int], max_rows: int, max_waste: float = 1.25) -> list[list[int]]:
    """Row indices sorted by length and cut into runs of at most `max_rows` rows whose
    padded size (rows x longest) stays within `max_waste` x their real tokens: padding is
    computed work, and a batch of mixed lengths costs several times its sorted runs."""
    chunks: list[list[int]] = []
    run: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if run and (len(run) >= max_rows or (len(run) + 1) * n > max_waste * (tokens + n)):
            chunks.append(run)
            run, tokens = [], 0
        run.append(i)
        tokens += n
    if run:
        chunks.append(run)
    return chunks


class OnnxSpamClassifier:
    """One ONNX Runtime session plus the GPT-2 tokenizer."""

    def __init__(
        self, path: str | Path, device: str = "auto", threads: int = 0, tokenizer_dir: str | Path | None = None
    ) -> None:
        import onnxruntime as ort

        from .tokenizer import get_tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelUnavailable(
                f"ONNX model {self.path} not found (run `gptpkg export_onnx`, "
                "or point the service at an exported model.onnx)"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # Idle intra-op threads sleep instead of spinning: a spinning pool burns the cores
        # that other workers (and the HTTP server) need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=choose_providers(device))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelUnavailable(f"ONNX model {self.path} unreadable: {type(e).__name__}: {e}") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_ids", "lengths"]:
            raise ModelUnavailable(f"{self.path}: inputs {names}, expected ['input_ids', 'lengths']")
        self.meta = ModelMeta.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        # BPE files shipped beside the model win over the mirror / tiktoken's own cache.
        bundled = Path(tokenizer_dir) if tokenizer_dir else self.path.parent
        mirror = bundled if (bundled / TOKENIZER_DIR / "vocab.bpe").is_file() else None
        self.tokenizer = get_tokenizer(mirror)
        self.providers = self.session.get_providers()
        # On CUDA, inputs are bound and copied to the device once per run and the logits
        # come back through the binding (no per-run allocation of outputs on the host).
        self.binding = self.session.io_binding() if self.providers[0] == CUDA else None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the classifier was trained on them (`encode_message`)."""
        return encode_message(self.tokenizer, text, self.meta.max_length)

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest row: (input_ids (B, T) int64, lengths (B,) int64)."""
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        batch = np.full((len(ids), int(lengths.max())), self.meta.pad_id, dtype=np.int64)
        for row, r in enumerate(ids):
            batch[row, : len(r)] = r
        return batch, lengths

    def logits(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.binding is None:
            return self.session.run(["logits"], {"input_ids": input_ids, "lengths": lengths})[0]
        self.binding.bind_cpu_input("input_ids", input_ids)
        self.binding.bind_cpu_input("lengths", lengths)
        self.binding.bind_output("logits", "cuda")
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0]

    def logits_of_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        """(N, n_labels) logits of already-tokenized rows, in order. Rows are sorted by
        length and run in `length_chunks` of at most `batch_size` (a row's logits do not
        depend on its batch mates or on padding)."""
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        for rows in length_chunks([len(r) for r in ids], batch_size):
            out[rows] = self.logits(*self.pad([ids[i] for i in rows]))
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
        """One {"label", "spam_probability"} per text, in order (see `results`)."""
        if not texts:
            return []
        return self.results(self.logits_of_ids([self.encode(t) for t in texts], batch_size))

    def results(self, logits: np.ndarray) -> list[dict]:
        """Per row: {"label": the argmax label, "spam_probability": softmax of the last label}."""
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        pos = self.labels[-1]  # labels are (ham, spam): index 1 is the positive class
        return [{"label": self.labels[int(row.argmax())], f"{pos}_probability": float(row[-1])} for row in p]

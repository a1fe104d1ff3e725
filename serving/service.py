"""The spam-classification HTTP service: BentoML 1.4 + ONNX Runtime, no torch.

    bentoml serve serving.service:SpamClassifier          # from the repo root

Routes: POST /classify {"texts": [...]} -> [{"label", "spam_probability"}, ...] (adaptive
batching across requests), POST /classify_text {"text": "..."} -> one such object; and
BentoML's /livez, /readyz, /metrics, plus the OpenAPI page at /.

Settings are environment variables, read once at start (see `Settings`). The model is
the BentoML model store entry `GPTPKG_MODEL_TAG` (written by `gptpkg package`), or for
development `GPTPKG_MODEL_PATH` (an exported model.onnx, or the folder holding it).

Texts: any Unicode string, the empty string included. A text is cut to the model's
`max_length` tokens (its first tokens, the rule the classifier was trained with); texts
longer than `GPTPKG_MAX_TEXT_CHARS` characters are rejected (400) before tokenizing.
Each text is padded on the right and read at its last real token, so its result does
not depend on which other texts share its batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import BaseModel, Field, StringConstraints

from gptpkg.onnx_classifier import FP32_FILE, ModelUnavailable, OnnxSpamClassifier

DEFAULT_TAG = "gptpkg-spam-classifier:latest"


def _env_int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"${name}={raw!r}: expected an integer >= {low}") from None
    if value < low:
        raise ValueError(f"${name}={value}: expected an integer >= {low}")
    return value


@dataclass(frozen=True)
class Settings:
    model_tag: str  # GPTPKG_MODEL_TAG: BentoML model store tag
    model_path: str  # GPTPKG_MODEL_PATH: dev override (model.onnx or its folder); wins when set
    device: str  # GPTPKG_DEVICE: auto (CUDA when onnxruntime has it) | cpu | cuda
    batching: bool  # GPTPKG_BATCHING: on | off (adaptive batching of /classify)
    max_batch_size: int  # GPTPKG_MAX_BATCH_SIZE: texts per model run when batching
    max_latency_ms: int  # GPTPKG_MAX_LATENCY_MS: a queued request waits at most this long
    max_texts: int  # GPTPKG_MAX_TEXTS: texts per request
    max_text_chars: int  # GPTPKG_MAX_TEXT_CHARS: characters per text
    ort_threads: int  # GPTPKG_ORT_THREADS: ONNX Runtime intra-op threads (0 = its default)

    @classmethod
    def from_env(cls) -> Settings:
        batching = os.environ.get("GPTPKG_BATCHING", "on").lower()
        if batching not in ("on", "off"):
            raise ValueError(f"$GPTPKG_BATCHING={batching!r}: expected on|off")
        return cls(
            model_tag=os.environ.get("GPTPKG_MODEL_TAG", DEFAULT_TAG),
            model_path=os.environ.get("GPTPKG_MODEL_PATH", ""),
            device=os.environ.get("GPTPKG_DEVICE", "auto"),
            batching=batching == "on",
            max_batch_size=_env_int("GPTPKG_MAX_BATCH_SIZE", 64),
            max_latency_ms=_env_int("GPTPKG_MAX_LATENCY_MS", 1000),
            max_texts=_env_int("GPTPKG_MAX_TEXTS", 64),
            max_text_chars=_env_int("GPTPKG_MAX_TEXT_CHARS", 10_000),
            ort_threads=_env_int("GPTPKG_ORT_THREADS", 0, low=0),
        )


def resolve_model(settings: Settings) -> Path:
    """The ONNX file to serve; a clear ModelUnavailable when there is none."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        path = path / FP32_FILE if path.is_dir() else path
        if not path.is_file():
            raise ModelUnavailable(f"$GPTPKG_MODEL_PATH={settings.model_path}: no ONNX model at {path}")
        return path
    try:
        stored = bentoml.models.get(settings.model_tag)  # local store only, never the network
    except (bentoml.exceptions.NotFound, ValueError) as e:
        raise ModelUnavailable(
            f"model {settings.model_tag!r} is not in the BentoML model store ({e}). Run `gptpkg export_onnx` "
            "and `gptpkg package`, or set GPTPKG_MODEL_TAG / GPTPKG_MODEL_PATH (an exported model.onnx)."
        ) from None
    onnx_file = stored.info.metadata.get("onnx_file", FP32_FILE)
    return Path(stored.path) / onnx_file


SETTINGS = Settings.from_env()
# Found and opened once at import (on CPU, then dropped), so `bentoml serve` exits with
# a clear error when the model is missing or unreadable, instead of restarting a worker
# that cannot start; each worker opens its own session in SpamClassifier.__init__.
MODEL_FILE = resolve_model(SETTINGS)
OnnxSpamClassifier(MODEL_FILE, device="cpu")

Text = Annotated[str, StringConstraints(max_length=SETTINGS.max_text_chars)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=SETTINGS.max_texts)]


class Prediction(BaseModel):
    label: str = Field(description="the predicted label: 'spam' or 'ham'")
    spam_probability: float = Field(ge=0.0, le=1.0, description="softmax probability of 'spam'")


class JsonOnly:
    """ASGI middleware: POSTs to the classify routes must be application/json and at most
    `max_bytes` long (415 / 413 with a JSON message otherwise)."""

    def __init__(self, app, routes: tuple[str, ...], max_bytes: int) -> None:
        self.app, self.routes, self.max_bytes = app, routes, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in self.routes:
            headers = dict(scope["headers"])
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if ctype != "application/json":
                return await self._reject(send, 415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._reject(send, 413, f"request body of {int(length)} bytes exceeds {self.max_bytes}")
        await self.app(scope, receive, send)

    @staticmethod
    async def _reject(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@bentoml.service(name="spam_classifier", traffic={"timeout": 30})
class SpamClassifier:
    # Declared so `bentoml build` packs the stored model into the Bento (not with a path override).
    if not SETTINGS.model_path:
        model_ref = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        self.clf = OnnxSpamClassifier(MODEL_FILE, device=SETTINGS.device, threads=SETTINGS.ort_threads)
        if tuple(self.clf.labels) != ("ham", "spam"):
            raise ModelUnavailable(f"{MODEL_FILE}: labels {self.clf.labels}, expected ['ham', 'spam']")
        print(
            f"spam_classifier: {MODEL_FILE} on {self.clf.providers}, batching {'on' if SETTINGS.batching else 'off'}",
            flush=True,
        )

    @bentoml.api(
        route="/classify",
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def classify(self, texts: Texts) -> list[Prediction]:
        """Classify each text; one {label, spam_probability} per text, in order."""
        return [Prediction(**r) for r in self.clf.predict(texts, batch_size=SETTINGS.max_batch_size)]

    @bentoml.api(route="/classify_text")
    def classify_text(self, text: Text) -> Prediction:
        """Classify one text."""
        return Prediction(**self.clf.predict([text])[0])


# Worst case body: max_texts texts of max_text_chars characters, JSON-escaped (\uXXXX = 6 bytes).
SpamClassifier.add_asgi_middleware(
    JsonOnly,
    routes=("/classify", "/classify_text"),
    max_bytes=SETTINGS.max_texts * (SETTINGS.max_text_chars * 6 + 8) + 1024,
)

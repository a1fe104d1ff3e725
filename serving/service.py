"""The spam-classification HTTP service: BentoML 1.4 + ONNX Runtime, no torch.

    bentoml serve serving.service:SpamClassifier          # from the repo root

Routes: POST /classify {"texts": [...]} -> [{"label", "spam_probability"}, ...], POST
/classify_text {"text": "..."} -> one such object; BentoML's /livez, /readyz and the
OpenAPI page at / (spec at /docs.json); /metrics (Prometheus text, unless
GPTPKG_METRICS=off).

Settings are `GPTPKG_*` environment variables (serving/settings.py). The model is the
declared BentoML model `GPTPKG_MODEL_TAG`, by default the promoted one
(`gptpkg-spam-classifier-served:latest`, written by `gptpkg promote`; `bentoml build`
packs it into the Bento). For development from source, `GPTPKG_MODEL_PATH` (an exported
model.onnx, or its folder) replaces it; a Bento refuses that override, at build and at
serve (the bentofiles set the Bento argument `bento=true`).

Texts: any Unicode string, the empty string included. A text is cut to the model's
`max_length` tokens (its first tokens, the rule the classifier was trained with); texts
longer than `GPTPKG_MAX_TEXT_CHARS` characters are rejected (400) before tokenizing.
Each text is padded on the right and read at its last real token, so its result does
not depend on which other texts share its batch.

Speed: the API methods are async and run ONNX Runtime inline on the worker's event loop
(one intra-op thread, one worker per core), so a request never waits for a thread-pool
hop; BentoML's access log and tracing are off by default (GPTPKG_TRACING=on brings the
spans back), and so are its Prometheus metrics: the service's own (serving/metrics.py)
cost less CPU per request. docs/performance.md: what each one measured.

Metrics (serving/metrics.py, prometheus_client): per route, a latency histogram by status
(gptpkg_http_request_duration_seconds, its _count the answers), requests in flight
(gptpkg_http_requests_in_flight), with buckets set for this model's millisecond answers;
gptpkg_model_info (the served model's tag, variant and device as labels, value 1).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field, StringConstraints

from gptpkg.errors import GptpkgError
from gptpkg.onnx_classifier import CUDA, FP32_FILE, INT8_FILE, ModelUnavailable, OnnxSpamClassifier
from serving.http_limits import ClientErrorsInOneLine, RequestLimits, max_body_bytes
from serving.metrics import RequestMetrics, batch_texts_histogram, export_model_info
from serving.settings import Settings, SettingsError, load_settings


class BentoArgs(BaseModel):
    bento: bool = False  # set by the bentofiles: true while a Bento is built and served


@contextlib.contextmanager
def _refused_in_one_line():
    """A start the user's settings or model refuse ends as one line on stderr, exit 1:
    BentoML would bury it in a traceback, or, serving a Bento, report a failed import of
    the tag as a module. GPTPKG_DEBUG=1 keeps the traceback."""
    try:
        yield
    except GptpkgError as e:
        if os.environ.get("GPTPKG_DEBUG", "") not in ("", "0"):
            raise
        print(f"spam_classifier: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# The logger of BentoML's request handler (its `log_exception`); a filter is the logging
# module's way to rewrite the records of one logger.
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsInOneLine())

with _refused_in_one_line():
    SETTINGS = load_settings()
if bentoml.use_arguments(BentoArgs).bento and SETTINGS.model_path:
    with _refused_in_one_line():
        raise SettingsError(
            f"GPTPKG_MODEL_PATH={SETTINGS.model_path!r}: a Bento serves the model it packs (GPTPKG_MODEL_TAG, "
            "from the BentoML model store); the path override is for serving from source only. Unset it."
        )


def model_file(settings: Settings, stored: bentoml.Model | None) -> Path:
    """The ONNX file to serve: the development override, else the declared model's entry
    in the store (`stored`). A clear ModelUnavailable when there is none."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        path = path / FP32_FILE if path.is_dir() else path
        if not path.is_file():
            raise ModelUnavailable(f"$GPTPKG_MODEL_PATH={settings.model_path}: no ONNX model at {path}")
        return path
    if stored is None:
        raise ModelUnavailable(
            f"model {settings.model_tag!r} is not in the BentoML model store. Run `gptpkg package` and "
            "`gptpkg promote` (which makes a packaged version the served one), or set GPTPKG_MODEL_TAG / "
            "GPTPKG_MODEL_PATH (an exported model.onnx)."
        )
    return Path(stored.path) / stored.info.metadata.get("onnx_file", FP32_FILE)


def model_info(settings: Settings, stored: bentoml.Model | None, path: Path) -> dict[str, str]:
    """The labels of gptpkg_model_info: the store tag resolved to its version (the path
    when serving from source) and the variant `gptpkg package` recorded (else the file's)."""
    variant = "int8" if path.name == INT8_FILE else "fp32"
    if settings.model_path or stored is None:
        return {"model_tag": str(path), "variant": variant}
    return {"model_tag": str(stored.tag), "variant": str(stored.info.metadata.get("variant", variant))}


# Declared unless the development override is set (which a Bento refuses, above), so
# `bentoml build` packs it and a Bento serves it.
MODEL = None if SETTINGS.model_path else bentoml.models.BentoModel(SETTINGS.model_tag)
# Found and opened once at import (on CPU, then dropped), so `bentoml serve` exits with
# a clear error when the model is missing or unreadable, instead of restarting a worker
# that cannot start; each worker opens its own session in SpamClassifier.__init__.
# `.stored` looks in the local store only (resolving a missing model would try BentoCloud).
with _refused_in_one_line():
    OnnxSpamClassifier(model_file(SETTINGS, MODEL.stored if MODEL else None), device="cpu")

Text = Annotated[str, StringConstraints(max_length=SETTINGS.max_text_chars)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=SETTINGS.max_texts)]


class Prediction(BaseModel):
    label: str = Field(description="the predicted label: 'spam' or 'ham'")
    spam_probability: float = Field(ge=0.0, le=1.0, description="softmax probability of 'spam'")


ROUTES = ("/classify", "/classify_text")
# The paths the metrics name as routes (any other path is "other"): the API, BentoML's
# health checks, the OpenAPI page and spec.
SERVED_ROUTES = (*ROUTES, "/livez", "/readyz", "/healthz", "/", "/docs.json")
# Request latency histogram bounds, in seconds: Prometheus' default buckets start at 5 ms,
# coarser than a one-text answer of this model (docs/performance.md), so a p50 or p99 read
# from them would be a bucket bound; these resolve 0.5 ms up to the 30 s request timeout.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The media type stated up front spares BentoML deriving it from the JSON schema of the
# output model on every response.
JSON = ContentType("application/json")


@bentoml.service(
    name="spam_classifier",
    workers=SETTINGS.workers,
    traffic={"timeout": 30},
    logging={"access": {"enabled": False}},
    # BentoML's metrics middleware off: RequestMetrics (serving/metrics.py) does the same
    # work for less CPU per request and serves /metrics.
    metrics={"enabled": False},
    tracing={} if SETTINGS.tracing else {"excluded_urls": list(ROUTES)},
)
class SpamClassifier:
    if MODEL is not None:
        model_ref = MODEL

    def __init__(self) -> None:
        stored = self.model_ref if MODEL else None  # the store entry BentoML resolved
        path = model_file(SETTINGS, stored)
        self.clf = OnnxSpamClassifier(path, device=SETTINGS.device, threads=SETTINGS.ort_threads)
        if tuple(self.clf.labels) != ("ham", "spam"):
            raise ModelUnavailable(f"{path}: labels {self.clf.labels}, expected ['ham', 'spam']")
        if SETTINGS.metrics:
            device = "cuda" if self.clf.providers[0] == CUDA else "cpu"
            export_model_info({**model_info(SETTINGS, stored, path), "device": device})
        self.batch_texts = None
        if SETTINGS.metrics and SETTINGS.batching:
            self.batch_texts = batch_texts_histogram(SETTINGS.max_batch_size).observe
        # One run before the worker reports ready, so its first request does not pay the
        # session's first-run set-up (a replacement worker takes traffic at full speed).
        self.clf.predict(["warm-up"])
        # Everything loaded so far (BentoML, pydantic, ONNX Runtime) leaves the garbage
        # collector's view: its full collections over those objects stalled the worker often
        # enough to double the p99 latency under load (docs/performance.md).
        gc.collect()
        gc.freeze()
        print(
            f"spam_classifier: {path} on {self.clf.providers}, batching {'on' if SETTINGS.batching else 'off'}",
            flush=True,
        )

    @bentoml.api(
        route="/classify",
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    async def classify(self, texts: Texts) -> Annotated[list[Prediction], JSON]:
        """Classify each text; one {label, spam_probability} per text, in order."""
        if self.batch_texts:
            self.batch_texts(len(texts))
        return self.clf.predict(texts, batch_size=SETTINGS.max_batch_size)

    @bentoml.api(route="/classify_text")
    async def classify_text(self, text: Text) -> Annotated[Prediction, JSON]:
        """Classify one text."""
        return self.clf.predict([text])[0]


if SETTINGS.metrics:
    # Added first, so it is outside RequestLimits and counts its 413 and 415 answers too.
    SpamClassifier.add_asgi_middleware(RequestMetrics, routes=SERVED_ROUTES, buckets=LATENCY_BUCKETS_S)
SpamClassifier.add_asgi_middleware(
    RequestLimits,
    routes=ROUTES,
    max_bytes=max_body_bytes(SETTINGS.max_texts, SETTINGS.max_text_chars),
    metrics=SETTINGS.metrics,
)

"""The service's settings: environment variables `GPTPKG_*`, read once at start by
pydantic-settings (so a container takes them with `docker run -e`). A bad value stops
the service with a message naming the variable, its value and what was expected."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gptpkg.errors import GptpkgError

# The promoted model (`gptpkg promote`): `package` adds versions, never what is served.
DEFAULT_TAG = "gptpkg-spam-classifier-served:latest"
PREFIX = "GPTPKG_"


class SettingsError(GptpkgError, ValueError):
    """A GPTPKG_* environment variable holds a value the service cannot use."""


def _expects(text: str):
    return Field(json_schema_extra={"expected": text})


class Settings(BaseSettings):
    """Every field `x` is the environment variable GPTPKG_X."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="ignore", frozen=True, protected_namespaces=("settings_",)
    )

    # The BentoML model store entry the service declares; `bentoml build` packs it.
    model_tag: Annotated[str, Field(min_length=1), _expects("a BentoML model tag such as name:version")] = DEFAULT_TAG
    # Development override: an exported model.onnx, or the folder holding it. Read when a
    # worker starts, never at build time: a Bento always carries the store entry.
    model_path: Annotated[str, _expects("a path to model.onnx or its folder")] = ""
    device: Annotated[Literal["auto", "cpu", "cuda"], _expects("auto|cpu|cuda")] = "auto"
    # Worker processes: a number, or cpu_count (one per core).
    workers: Annotated[Annotated[int, Field(ge=1)] | Literal["cpu_count"], _expects("an integer >= 1 or cpu_count")] = (
        "cpu_count"
    )
    # Prometheus metrics at /metrics (serving/metrics.py: per-route latency histograms by
    # status, requests in flight, the served model's labels): on, for operators.
    metrics: Annotated[bool, _expects("on|off")] = True
    # OpenTelemetry spans of the classify routes: off, as BentoML has no exporter set by
    # default and the spans cost CPU per request (docs/performance.md).
    tracing: Annotated[bool, _expects("on|off")] = False
    batching: Annotated[bool, _expects("on|off")] = False
    max_batch_size: Annotated[int, Field(ge=1), _expects("an integer >= 1")] = 64
    max_latency_ms: Annotated[int, Field(ge=1), _expects("an integer >= 1")] = 1000
    max_texts: Annotated[int, Field(ge=1), _expects("an integer >= 1")] = 64
    max_text_chars: Annotated[int, Field(ge=1), _expects("an integer >= 1")] = 10_000
    # ONNX Runtime intra-op threads per worker (0 = ONNX Runtime's default: one per core).
    ort_threads: Annotated[int, Field(ge=0), _expects("an integer >= 0")] = 1


def load_settings() -> Settings:
    """The settings from the environment; SettingsError naming each bad variable."""
    try:
        return Settings()
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            name = str(err["loc"][0])
            extra = Settings.model_fields[name].json_schema_extra or {}
            problems.append(f"{PREFIX}{name.upper()}={err['input']!r}: expected {extra.get('expected', err['msg'])}")
        raise SettingsError("; ".join(dict.fromkeys(problems))) from None

"""Run one pipeline stage by name: open its logger (W&B for training stages), call the
stage function, then write its metrics JSON and its per-eval history for plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .checkpoint import atomic_write_text
from .config import from_dict, section
from .distributed import is_main_process
from .loggers import MultiLogger, NullLogger, StdoutLogger, WandbLogger, wandb_from_env
from .plots import write_stage_plots
from .stages import (
    SECTION_CONFIGS, Paths, WandbConfig, paths_of, stage_config, training_params, validate_params, write_metrics,
)


def _fetch(params, logger, resume, progress):
    from .stages import fetch
    return fetch(params)


def _prepare(params, logger, resume, progress):
    from .stages import prepare
    return prepare(params)


def _pretrain(params, logger, resume, progress):
    from .pretrain import run
    return run(params, logger, resume, progress)


def _finetune_spam(params, logger, resume, progress):
    from .finetune import run_spam
    return run_spam(params, logger, resume, progress)


def _baseline_spam(params, logger, resume, progress):
    from .baseline import run
    return run(params)


def _finetune_instruct(params, logger, resume, progress):
    from .finetune import run_instruct
    return run_instruct(params, logger, resume, progress)


def _export_onnx(params, logger, resume, progress):
    from .export import run
    return run(params)


def _package(params, logger, resume, progress):
    from .export import package
    return package(params)


# name -> (stage function, the `paths` key of the checkpoint it trains, or None)
STAGES: dict[str, tuple[Callable[..., dict[str, Any]], str | None]] = {
    "fetch": (_fetch, None),
    "prepare": (_prepare, None),
    "pretrain": (_pretrain, "pretrained"),
    "finetune_spam": (_finetune_spam, "spam_classifier"),
    "baseline_spam": (_baseline_spam, None),
    "finetune_instruct": (_finetune_instruct, "instruct_model"),
    "export_onnx": (_export_onnx, None),
    "package": (_package, None),
}


def open_logger(params: dict, stage: str, paths: Paths) -> tuple[Any, WandbLogger | None]:
    """Stdout plus a W&B run (offline unless params/env say otherwise). The run folder is
    given as an absolute path: W&B's service process may run in another directory."""
    wcfg = from_dict(WandbConfig, wandb_from_env(section(params, "wandb")), "params.wandb")
    if wcfg.mode == "disabled":
        return StdoutLogger(), None
    wb = WandbLogger(project=wcfg.project, entity=wcfg.entity or None, name=stage, mode=wcfg.mode,
                     dir=Path(paths.wandb).resolve(), job_type=stage, config={stage: params.get(stage, {})})
    return MultiLogger(StdoutLogger(), wb), wb


# Figures that differ from run to run (speed, wall time, the W&B run folder): written to
# metrics/runtime/<stage>.json, so metrics/<stage>.json is identical on a rerun with the
# same params and seed (CPU) and `dvc metrics diff` shows only real changes.
RUNTIME_KEYS = ("wall_time_s", "tokens_per_s", "examples_per_s", "wandb_run", "stage_wall_time_s", "stage_cpu_time_s",
                "cv_wall_time_s")


def split_runtime(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(deterministic metrics, run-dependent figures)."""
    runtime = {k: metrics[k] for k in RUNTIME_KEYS if k in metrics}
    return {k: v for k, v in metrics.items() if k not in runtime}, runtime


def check_openai_weights(params: dict, name: str) -> None:
    """init: openai needs a local Hugging Face gpt2 folder; say which key, before any work."""
    from .config import ConfigError

    sec = params.get(name) or {}
    if sec.get("init") != "openai":
        return
    folder = Path(sec.get("openai_weights") or "")
    if not sec.get("openai_weights") or not (folder / "config.json").is_file():
        raise ConfigError(
            f"params.{name}.openai_weights={sec.get('openai_weights')!r}: init: openai needs a local folder "
            f"with the Hugging Face gpt2 files (config.json + model.safetensors); nothing is downloaded")


def check_resumable(params: dict, name: str, checkpoint_dir: Path) -> None:
    """`--resume` continues only a checkpoint written with the same training params, so
    a resumed result is the one params.yaml describes (and what dvc.lock records)."""
    from dataclasses import asdict

    from .checkpoint import check_same_training

    own, train = stage_config(params, name, SECTION_CONFIGS[name])
    check_same_training(checkpoint_dir, asdict(train), f"params.{name}", training_params(own))


def run_stage(name: str, params: dict, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run stage `name`; write metrics/<stage>.json, metrics/runtime/<stage>.json and
    its plot files. Returns all metrics (runtime figures included)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    fn, ckpt_key = STAGES[name]
    # Every section the stage reads parses before anything runs: a typo or a wrong type
    # stops the stage here, with no W&B run opened and no output touched.
    validate_params(params, [s for s in ("paths", "data", name, "wandb") if s in SECTION_CONFIGS])
    check_openai_weights(params, name)
    paths = paths_of(params)
    main = is_main_process()  # under torchrun only rank 0 logs and writes files
    if resume and ckpt_key:
        check_resumable(params, name, Path(getattr(paths, ckpt_key)))
    if ckpt_key:  # a training stage
        from .perf import keep_freed_memory

        keep_freed_memory()
    t0, cpu0 = time.perf_counter(), time.process_time()
    logger, wb = open_logger(params, name, paths) if (ckpt_key and main) else (NullLogger(), None)
    try:
        metrics = fn(params, logger, resume, progress)
        history = metrics.pop("history", None)
        samples = metrics.pop("samples", None)
        if not main:
            return metrics
        write_stage_plots(paths.plots, name, history, metrics)
        if samples is not None:
            atomic_write_text(Path(paths.metrics) / f"{name}_samples.json", json.dumps(samples, indent=1) + "\n")
        if wb is not None:
            metrics["wandb_run"] = wb.run_path
            wb.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            wb.log_artifact(getattr(paths, ckpt_key), name=f"{name}-checkpoint", type="model")
        metrics["stage_wall_time_s"] = time.perf_counter() - t0
        metrics["stage_cpu_time_s"] = time.process_time() - cpu0  # all threads; on a busy machine
        stable, runtime = split_runtime(metrics)
        write_metrics(paths, name, stable)
        atomic_write_text(Path(paths.metrics) / "runtime" / f"{name}.json",
                          json.dumps(runtime, indent=2, sort_keys=True) + "\n")
    finally:
        logger.finish()
    if wb is not None:
        print(wb.where())
    return metrics

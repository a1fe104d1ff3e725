"""Run one pipeline stage by name: open its logger (W&B for training stages and for
export_onnx, which logs the model it exports), call the stage function with its typed
params section, then write its metrics JSON, its runtime figures and its plot files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import Params
from .files import write_json
from .loggers import MultiLogger, NullLogger, StdoutLogger, WandbLogger, wandb_from_env
from .pipeline import STAGES, Stage, StageContext
from .plots import write_stage_plots

# Figures that differ from run to run (speed, wall time, the W&B run folder) and the run's
# record (paths, hashes, tags: any text value): written to metrics/runtime/<stage>.json, so
# metrics/<stage>.json holds only figures, identical on a rerun with the same params and
# seed (CPU), and `dvc metrics diff` shows only real changes.
RUNTIME_KEYS = (
    "wall_time_s",
    "tokens_per_s",
    "examples_per_s",
    "wandb_run",
    "stage_wall_time_s",
    "stage_cpu_time_s",
    "cv_wall_time_s",
    "mfu",
    "mfu_overall",
    "peak_flops",
    "gpu",
    "export_s",
    "compiled",
    "tokenized_units",
)


def split_runtime(metrics: dict[str, Any], figures: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(deterministic figures, run-dependent figures and the record). A stage whose metrics
    file is a record itself (not `figures`) keeps its text there."""
    runtime = {k: v for k, v in metrics.items() if k in RUNTIME_KEYS or (figures and isinstance(v, str))}
    return {k: v for k, v in metrics.items() if k not in runtime}, runtime


def report_to_dagster(name: str, runtime: dict[str, Any]) -> None:
    """When Dagster started this stage through Pipes (`dvc repro` in between passes its
    environment on) and `dagster_pipes` is installed: this run's record (wall and CPU
    time, speed, the W&B run) as the materialization's metadata, and a log line. The
    figures stay in the metrics files, which the asset reads whether DVC ran the stage or
    not. Without Dagster nothing happens; gptpkg needs neither package."""
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return
    try:
        from dagster_pipes import open_dagster_pipes
    except ImportError:
        return
    record = {k: v for k, v in runtime.items() if isinstance(v, (bool, int, float, str))}
    with open_dagster_pipes() as pipes:
        pipes.log.info(f"gptpkg {name}: done in {runtime.get('stage_wall_time_s', 0):.1f} s")
        pipes.report_asset_materialization(metadata=record)


def open_logger(params: Params, stage: Stage) -> tuple[Any, WandbLogger | None]:
    """Stdout plus a W&B run (offline unless params/env say otherwise). The run folder is
    given as an absolute path: W&B's service process may run in another directory."""
    wcfg = wandb_from_env(params.wandb.model_dump())
    if wcfg["mode"] == "disabled":
        return StdoutLogger(), None
    section = getattr(params, stage.params_section).model_dump()
    wb = WandbLogger(
        project=wcfg["project"],
        entity=wcfg["entity"] or None,
        name=stage.name,
        mode=wcfg["mode"],
        dir=Path(params.paths.wandb).resolve(),
        job_type=stage.name,
        config={stage.name: section},
    )
    return MultiLogger(StdoutLogger(), wb), wb


def run_stage(name: str, params: Params, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run stage `name`; write metrics/<stage>.json, metrics/runtime/<stage>.json and
    its plot files. Returns all metrics (runtime figures included)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    stage = STAGES[name]
    paths = params.paths
    main = True
    if stage.checkpoint:  # a training stage: it may run under torchrun
        from .distributed import is_main_process
        from .perf import keep_freed_memory

        main = is_main_process()  # only rank 0 logs and writes files
        keep_freed_memory()
    t0, cpu0 = time.perf_counter(), time.process_time()
    logs = (stage.checkpoint or stage.wandb) and main
    logger, wb = open_logger(params, stage) if logs else (NullLogger(), None)
    ctx = StageContext(
        paths=paths,
        data_mirror=params.data.mirror,
        logger=logger,
        resume=resume and bool(stage.checkpoint),
        progress=progress,
    )
    try:
        metrics = stage.function()(getattr(params, stage.params_section), ctx)
        history, samples = metrics.pop("history", None), metrics.pop("samples", None)
        if not main:
            return metrics
        write_stage_plots(paths.plots, name, history, metrics)
        if samples is not None:
            write_json(Path(paths.metrics) / f"{name}_samples.json", samples, indent=1)
        if wb is not None:
            metrics["wandb_run"] = wb.run_path
            wb.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if stage.checkpoint:
                wb.log_artifact(getattr(paths, stage.checkpoint), name=f"{name}-checkpoint", type="model")
        metrics["stage_wall_time_s"] = time.perf_counter() - t0
        metrics["stage_cpu_time_s"] = time.process_time() - cpu0  # all threads; on a busy machine
        stable, runtime = split_runtime(metrics, stage.figures)
        write_json(Path(paths.metrics) / f"{name}.json", stable)
        write_json(Path(paths.metrics) / "runtime" / f"{name}.json", runtime)
        report_to_dagster(name, runtime)
    finally:
        logger.finish()
        if stage.checkpoint:  # done training: stop compile workers, leave the process group
            from .distributed import stop_compile_workers, teardown

            stop_compile_workers()
            teardown()
    if wb is not None:
        print(wb.where())
    return metrics

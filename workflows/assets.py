"""One asset per DVC stage. Materializing it runs `dvc repro --single-item <stage>` in the
workspace, so DVC's cache and dvc.lock stay the one record; the asset's data version is
the hash of the stage's outputs as dvc.lock records them.

The command runs through Dagster Pipes (`PipesSubprocessClient`: the environment,
stdout/stderr into the step's logs, termination forwarded to DVC). The stage process,
DVC's child, inherits the Pipes environment: gptpkg's runner reports its run's record
(wall time, speed, the W&B run) through `dagster_pipes` when that is installed. The
figures, outputs and plots are read here from the files DVC records, so a stage DVC
skips (up to date: no process runs) still shows them."""

import base64
import json
import math
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from .dvc_project import Stage, human_size, lock_entry_version, outs_version, read_lock
from .resources import DvcBusy, DvcWorkspace, WandbResource

POOL = "dvc_workspace"  # one DVC workspace: dagster.yaml limits every pool to 1 (concurrency.pools)
LOCK_ENTRY_KEY = "dvc_lock_entry"  # metadata key the dvc.lock sensor compares against


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _value(v: Any) -> MetadataValue:
    if isinstance(v, bool):
        return MetadataValue.bool(v)
    if isinstance(v, int):
        return MetadataValue.int(v)
    if isinstance(v, float):
        return MetadataValue.float(v) if math.isfinite(v) else MetadataValue.text(str(v))
    if isinstance(v, (list, dict)):
        return MetadataValue.json(v)
    return MetadataValue.text(str(v))


def instruct_sample(root: Path, stage: Stage) -> dict[str, Any]:
    """finetune_instruct's test answers beside the reference and the retrieval baseline's
    (its responses file in the same folder), 10 items as a markdown table."""
    from gptpkg.answers import BASELINE_RESPONSES, MODEL_RESPONSES, sample_table

    rel = next((o for o in stage.outs if Path(o).name == MODEL_RESPONSES), None)
    rows = [_read_list(root / rel), _read_list(root / Path(rel).with_name(BASELINE_RESPONSES))] if rel else [None]
    return {"test_sample": MetadataValue.md(sample_table(rows[0], rows[1]))} if rows[0] else {}


def _read_list(path: Path) -> list | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) else None


def stage_metadata(stage: Stage, root: Path, lock_entry: dict[str, Any] | None) -> dict[str, Any]:
    """Figures from the stage's metrics file (not its runtime record: that is the run's,
    and arrives through Pipes when the stage runs), its outputs (path, size, DVC hash) and plots."""
    md: dict[str, Any] = {}
    for rel in stage.metrics:
        if "/runtime/" in "/" + rel:
            continue
        for k, v in (read_json(root / rel) or {}).items():
            if v is not None:
                md[k] = _value(v)
    if lock_entry:
        rows = ["| output | size | files | DVC md5 |", "| --- | --- | --- | --- |"]
        for o in lock_entry.get("outs", []):
            rows.append(
                f"| `{o['path']}` | {human_size(o.get('size'))} | {o.get('nfiles', 1)} | `{o.get('md5', '')}` |"
            )
        md["outputs"] = MetadataValue.md("\n".join(rows))
        md["output_bytes"] = MetadataValue.int(sum(int(o.get("size") or 0) for o in lock_entry.get("outs", [])))
        md[LOCK_ENTRY_KEY] = MetadataValue.text(lock_entry_version(lock_entry) or "")
    if stage.outs:
        md["path"] = MetadataValue.path(str(root / stage.outs[0]))
    for rel in stage.plots:
        p = root / rel
        if p.suffix == ".png" and p.is_file():
            data = base64.b64encode(p.read_bytes()).decode()
            md[f"plot_{p.stem}"] = MetadataValue.md(f"![{p.stem}](data:image/png;base64,{data})\n\n`{rel}`")
    if stage.name == "finetune_instruct":
        md.update(instruct_sample(root, stage))
    return md


def run_stage(
    context: AssetExecutionContext,
    stage: Stage,
    dvc: DvcWorkspace,
    wandb: WandbResource,
    client: PipesSubprocessClient,
) -> MaterializeResult | None:
    """`dvc repro --single-item <stage>` through Pipes unless `dvc status` calls the stage
    up to date; the stage (gptpkg's runner) reports its run's record through Pipes.
    Returns that report, None when DVC had nothing to run."""
    try:
        will_run = stage.name in dvc.status(stage.name)
    except DvcBusy as e:
        raise Failure(f"the DVC workspace {dvc.path} is busy (a `dvc` command from a shell?): {e}") from None
    args = ["repro", "--single-item", stage.name]
    if not will_run:
        context.log.info(f"`dvc status`: {stage.name} is up to date, nothing to run (in {dvc.path})")
        return None
    context.log.info(f"$ dvc {' '.join(args)}    (in {dvc.path})")
    # The stage's stdout/stderr go to this step's (the run's logs) through Pipes.
    try:
        completed = client.run(
            context=context, command=dvc.command(*args), cwd=str(dvc.path), env={**dvc.env(), **wandb.env()}
        )
    except Exception as e:  # a non-zero exit (dagster does not export Pipes' error class)
        raise Failure(
            f"`dvc {' '.join(args)}` failed ({e}): the stage's own error ends this step's stderr",
            metadata={"workspace": MetadataValue.path(str(dvc.path))},
        ) from e
    return completed.get_materialize_result()


def stage_asset(stage: Stage) -> AssetsDefinition:
    outs = "\n".join(f"- `{o}`" for o in stage.outs)

    @asset(
        name=stage.name,
        deps=list(stage.upstream),
        group_name=stage.group,
        code_version=stage.code_version,
        pool=POOL,
        kinds={"dvc"},
        description=f"DVC stage `{stage.name}`: `{stage.cmd}`\n\nOutputs:\n{outs}",
    )
    def _materialize(
        context: AssetExecutionContext,
        dvc: DvcWorkspace,
        wandb: WandbResource,
        pipes_subprocess_client: PipesSubprocessClient,
    ) -> MaterializeResult:
        with dvc.run_params() as changed:
            if changed:
                context.log.info(
                    f"params.yaml: this run's config (profile={dvc.profile!r}, set={list(dvc.set)}) changes "
                    f"{', '.join(changed)}; the file gets its own bytes back after the stage"
                )
            reported = run_stage(context, stage, dvc, wandb, pipes_subprocess_client)
        entry = read_lock(dvc.path).get(stage.name)
        if entry is None:
            raise Failure(f"`dvc repro --single-item {stage.name}` succeeded but dvc.lock has no entry for it")
        md = stage_metadata(stage, dvc.path, entry)
        md["dvc_skipped"] = MetadataValue.bool(reported is None)
        for k, v in (reported.metadata if reported else {}).items():  # this run's record, from the stage
            md[k] = wandb.run_link(v.value) if k == "wandb_run" else v
        if changed:
            md["params_run_config"] = MetadataValue.json(changed)
        return MaterializeResult(data_version=DataVersion(outs_version(entry) or "none"), metadata=md)

    return _materialize

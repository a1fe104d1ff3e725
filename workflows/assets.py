"""One asset per DVC stage. Materializing it runs `dvc repro --single-item <stage>` in the
workspace, so DVC's cache and dvc.lock stay the one record; the asset's data version is
the hash of the stage's outputs as dvc.lock records them.

The command runs through Dagster Pipes (`PipesSubprocessClient`: the environment,
stdout/stderr into the step's logs, termination forwarded to DVC). The stage process does
not open a Pipes session itself: DVC sits between the two and gptpkg imports no
orchestrator code, so the metadata (metrics, outputs, plots) is read here, after the run,
from the files DVC records."""

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


def stage_metadata(
    stage: Stage, root: Path, lock_entry: dict[str, Any] | None, wandb: WandbResource | None = None
) -> dict[str, Any]:
    """Figures from the stage's metrics files, its outputs (path, size, DVC hash) and plots."""
    md: dict[str, Any] = {}
    for rel in stage.metrics:
        for k, v in (read_json(root / rel) or {}).items():
            if k == "wandb_run" and isinstance(v, str) and v:
                md["wandb_run"] = (wandb or WandbResource()).run_link(v)
            elif v is not None:
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
        changed = dvc.apply_params()
        if changed:
            context.log.warning(
                f"params.yaml: run config (profile={dvc.profile!r}, set={list(dvc.set)}) "
                f"wrote {len(changed)} key(s): {', '.join(changed)}"
            )
        try:
            will_run = stage.name in dvc.status(stage.name)
        except DvcBusy as e:
            raise Failure(f"the DVC workspace {dvc.path} is busy (a `dvc` command from a shell?): {e}") from None
        args = ["repro", "--single-item", stage.name]
        context.log.info(f"$ dvc {' '.join(args)}    (in {dvc.path}; DVC {'runs' if will_run else 'skips'} it)")
        # The stage's output goes to this step's stdout/stderr (the run's logs) through Pipes.
        try:
            pipes_subprocess_client.run(
                context=context, command=dvc.command(*args), cwd=str(dvc.path), env={**dvc.env(), **wandb.env()}
            )
        except Exception as e:  # a non-zero exit (dagster does not export Pipes' error class)
            raise Failure(
                f"`dvc {' '.join(args)}` failed ({e}): the stage's own error ends this step's stderr",
                metadata={"workspace": MetadataValue.path(str(dvc.path))},
            ) from e
        entry = read_lock(dvc.path).get(stage.name)
        if entry is None:
            raise Failure(f"`dvc repro --single-item {stage.name}` succeeded but dvc.lock has no entry for it")
        md = stage_metadata(stage, dvc.path, entry, wandb)
        md["dvc_skipped"] = MetadataValue.bool(not will_run)
        if changed:
            md["params_written"] = MetadataValue.json(changed)
        return MaterializeResult(data_version=DataVersion(outs_version(entry) or "none"), metadata=md)

    return _materialize

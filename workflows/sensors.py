"""Keep Dagster in step with `dvc repro` run from a shell: a stage whose dvc.lock entry
changed since Dagster last recorded it, and that `dvc status` calls up to date, gets a run
request. That run's `dvc repro --single-item` finds nothing to do, and Dagster records the
stage's data version (dvc.lock's output hashes) and provenance itself, so it calls stale
what DVC would rerun and nothing else."""

from __future__ import annotations

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from .assets import LOCK_ENTRY_KEY
from .dvc_project import load_stages, lock_entry_version, read_lock
from .resources import DvcBusy, DvcWorkspace


def _recorded(instance: DagsterInstance, name: str) -> str | None:
    """The dvc.lock entry hash the asset's latest materialization recorded (its metadata)."""
    ev = instance.get_latest_materialization_event(AssetKey(name))
    mat = ev.asset_materialization if ev else None
    val = mat.metadata.get(LOCK_ENTRY_KEY) if mat else None
    return getattr(val, "value", None)


def shell_run_stages(instance: DagsterInstance, dvc: DvcWorkspace) -> dict[str, str] | None:
    """{stage: dvc.lock entry hash} of the stages DVC reproduced outside Dagster and now
    calls up to date (None: the workspace is busy)."""
    lock = read_lock(dvc.path)
    entries = {s.name: lock_entry_version(lock.get(s.name)) for s in load_stages(dvc.path)}
    candidates = {n: e for n, e in entries.items() if e is not None and _recorded(instance, n) != e}
    if not candidates:
        return {}
    try:
        rerun = dvc.status()
    except DvcBusy:
        return None
    return {n: e for n, e in candidates.items() if n not in rerun}


@sensor(
    name="dvc_lock_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    # A sensor's run requests must fall inside its target: any stage (and its checks)
    target=AssetSelection.all(),
    description="records stages that `dvc repro` ran outside Dagster (new dvc.lock entries DVC calls up to date)",
)
def dvc_lock_sensor(context: SensorEvaluationContext, dvc: DvcWorkspace):
    stages = shell_run_stages(context.instance, dvc)
    if stages is None:
        return SkipReason("the DVC workspace is busy (a dvc command holds its lock); next tick")
    if not stages:
        return SkipReason("dvc.lock matches what Dagster recorded")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key="dvc.lock " + " ".join(f"{n}:{e}" for n, e in sorted(stages.items())),
                asset_selection=[AssetKey(n) for n in stages],
                tags={"dvc_lock_sensor": "dvc repro outside Dagster"},
            )
        ]
    )

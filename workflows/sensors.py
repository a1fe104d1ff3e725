"""Keep Dagster in step with `dvc repro` run from a shell: a stage whose dvc.lock entry
changed since Dagster last recorded it is reported as a (runless) materialization with
DVC's data version and provenance, so Dagster shows it fresh exactly when `dvc status`
does (and stale when DVC would rerun it)."""


from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from .assets import LOCK_ENTRY_KEY, stage_metadata
from .dvc_project import load_stages, lock_entry_version, outs_version, read_lock
from .resources import DvcWorkspace

CHANGED = "dvc-changed"  # provenance of a stage DVC considers out of date: never equals a real version


def _recorded_entry(instance: DagsterInstance, name: str) -> str | None:
    ev = instance.get_latest_materialization_event(AssetKey(name))
    mat = ev.asset_materialization if ev else None
    val = mat.metadata.get(LOCK_ENTRY_KEY) if mat else None
    return getattr(val, "value", None)


def dvc_status(root) -> dict:
    """`dvc status` of the workspace: {stage: [changes]} for every stage DVC would rerun."""
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        return repo.status()
    finally:
        repo.close()


def shell_run_events(instance: DagsterInstance, dvc: DvcWorkspace) -> list[AssetMaterialization] | None:
    """Materializations for the stages DVC ran outside Dagster (None: the workspace is busy)."""
    lock = read_lock(dvc.path)
    stages = load_stages(dvc.path)
    todo = [s for s in stages if lock_entry_version(lock.get(s.name))
            and _recorded_entry(instance, s.name) != lock_entry_version(lock.get(s.name))]
    if not todo:
        return []
    with dvc.locked(wait=False) as got:
        if not got:
            return None
        try:
            status = dvc_status(dvc.path)
        except Exception as e:  # DVC's own repo lock held by a shell `dvc repro`
            if "lock" in str(e).lower():
                return None
            raise
        lock = read_lock(dvc.path)
    events = []
    for s in todo:
        entry = lock.get(s.name)
        fresh = s.name not in status
        tags = {"dagster/data_version": outs_version(entry) or "none",
                "dagster/data_version_is_user_provided": "true",
                "dagster/code_version": s.code_version if fresh else CHANGED}
        for u in s.upstream:
            v = outs_version(lock.get(u))
            tags[f"dagster/input_data_version/{u}"] = v if fresh and v else CHANGED
        md = stage_metadata(s, dvc.path, entry)
        md["reported_by"] = "dvc.lock sensor: stage reproduced outside Dagster (dvc repro)"
        events.append(AssetMaterialization(asset_key=s.name, metadata=md, tags=tags,
                                           description="dvc repro outside Dagster"))
    return events


@sensor(name="dvc_lock_sensor", minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
        description="records stages that `dvc repro` ran outside Dagster (from dvc.lock), so both agree on what is stale")
def dvc_lock_sensor(context: SensorEvaluationContext, dvc: DvcWorkspace):
    events = shell_run_events(context.instance, dvc)
    if events is None:
        return SkipReason("the DVC workspace is busy (a stage is running); next tick")
    if not events:
        return SkipReason("dvc.lock matches what Dagster recorded")
    return SensorResult(asset_events=events)

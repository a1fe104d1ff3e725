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


def _recorded(instance: DagsterInstance, name: str) -> tuple[str | None, dict[str, str]]:
    """(dvc.lock entry hash, input data versions) of the asset's latest materialization."""
    ev = instance.get_latest_materialization_event(AssetKey(name))
    mat = ev.asset_materialization if ev else None
    if mat is None:
        return None, {}
    val = mat.metadata.get(LOCK_ENTRY_KEY)
    prefix = "dagster/input_data_version/"
    inputs = {k[len(prefix) :]: v for k, v in (mat.tags or {}).items() if k.startswith(prefix)}
    return getattr(val, "value", None), inputs


def _latest_storage_id(instance: DagsterInstance, name: str) -> str:
    records = instance.fetch_materializations(AssetKey(name), limit=1).records
    return str(records[0].storage_id) if records else "NULL"


def dvc_status(root) -> dict:
    """`dvc status` of the workspace: {stage: [changes]} for every stage DVC would rerun."""
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:  # keys are addressed relative to the cwd ("../proj/dvc.yaml:prepare"): keep the stage name
        return {k.rsplit(":", 1)[-1]: v for k, v in repo.status().items()}
    finally:
        repo.close()


def shell_run_events(instance: DagsterInstance, dvc: DvcWorkspace) -> list[AssetMaterialization] | None:
    """Materializations for what DVC did outside Dagster (None: the workspace is busy):
    a stage whose dvc.lock entry Dagster has not recorded (`dvc repro` ran it), and a stage
    whose recorded inputs are older than DVC's although `dvc status` calls it up to date
    (an upstream stage reran, but the files this stage reads did not change)."""
    lock = read_lock(dvc.path)
    stages = load_stages(dvc.path)
    current = {s.name: outs_version(lock.get(s.name)) for s in stages}
    candidates = []
    for s in stages:
        entry = lock_entry_version(lock.get(s.name))
        if entry is None:
            continue
        rec_entry, rec_inputs = _recorded(instance, s.name)
        if rec_entry != entry:
            candidates.append((s, True))
        elif rec_entry is not None and any(rec_inputs.get(u) != current[u] for u in s.upstream if current[u]):
            candidates.append((s, False))
    if not candidates:
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
    current = {s.name: outs_version(lock.get(s.name)) for s in stages}
    events = []
    for s, reran in candidates:
        entry = lock.get(s.name)
        fresh = s.name not in status
        if not reran and not fresh:
            continue  # DVC would rerun it too: Dagster's "stale" is right
        tags = {
            "dagster/data_version": current[s.name] or "none",
            "dagster/data_version_is_user_provided": "true",
            "dagster/code_version": s.code_version if fresh else CHANGED,
        }
        for u in s.upstream:
            tags[f"dagster/input_data_version/{u}"] = current[u] if fresh and current[u] else CHANGED
            tags[f"dagster/input_event_pointer/{u}"] = _latest_storage_id(instance, u)
        md = stage_metadata(s, dvc.path, entry)
        md["reported_by"] = (
            "dvc.lock sensor: stage reproduced outside Dagster (dvc repro)"
            if reran
            else "dvc.lock sensor: an upstream stage reran but `dvc status` finds this stage up to date"
        )
        events.append(
            AssetMaterialization(
                asset_key=s.name,
                metadata=md,
                tags=tags,
                description="dvc repro outside Dagster" if reran else "up to date per dvc status",
            )
        )
    return events


@sensor(
    name="dvc_lock_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="records stages that `dvc repro` ran outside Dagster (from dvc.lock), so both agree on what is stale",
)
def dvc_lock_sensor(context: SensorEvaluationContext, dvc: DvcWorkspace):
    events = shell_run_events(context.instance, dvc)
    if events is None:
        return SkipReason("the DVC workspace is busy (a stage is running); next tick")
    if not events:
        return SkipReason("dvc.lock matches what Dagster recorded")
    return SensorResult(asset_events=events)

"""The Dagster definitions, derived from the DVC project at load time: a stage added to
dvc.yaml becomes an asset of the same name with the same dependencies."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job

from .assets import stage_asset
from .checks import build_checks
from .dvc_project import default_root, load_stages
from .resources import DvcWorkspace, QualityGates, WandbResource
from .sensors import dvc_lock_sensor

CLASSIFIER_STAGES = ("finetune_spam", "export_onnx", "package")


def build_definitions(root: str | Path | None = None) -> Definitions:
    root = Path(root).resolve() if root else default_root()
    stages = load_stages(root)
    names = [s.name for s in stages]
    jobs = [define_asset_job("full_pipeline", AssetSelection.all(),
                             description="every DVC stage in dependency order (DVC skips the unchanged ones)")]
    classifier = [n for n in CLASSIFIER_STAGES if n in names]
    if classifier:
        jobs.append(define_asset_job(
            "classifier_only", AssetSelection.assets(*classifier),
            description=f"{' → '.join(classifier)} from the existing pretrained checkpoint"))
    return Definitions(
        assets=[stage_asset(s) for s in stages],
        asset_checks=build_checks(stages),
        jobs=jobs,
        sensors=[dvc_lock_sensor],
        resources={"dvc": DvcWorkspace(root=str(root)), "wandb": WandbResource(), "gates": QualityGates()},
    )

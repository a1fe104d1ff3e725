"""The Dagster definitions, derived from the DVC project at load time: a stage added to
dvc.yaml becomes an asset of the same name with the same dependencies."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, PipesSubprocessClient, define_asset_job

from gptpkg.stages import STAGES

from .assets import stage_asset
from .checks import build_checks
from .dvc_project import Stage, default_root, load_stages
from .resources import DvcWorkspace, WandbResource
from .sensors import dvc_lock_sensor


def classifier_stages(stages: list[Stage]) -> list[str]:
    """The stages of the `classifier_only` job, in dvc.yaml order: the registry stage that
    trains the spam classifier (`gptpkg.stages.STAGES`, checkpoint `spam_classifier`) and
    the registry stages downstream of it in dvc.yaml (export_onnx, package). A dvc.yaml
    stage the registry does not know stays out."""
    picked = {s.name for s in stages if s.name in STAGES and STAGES[s.name].checkpoint == "spam_classifier"}
    grew = True
    while grew:  # downstream closure (dvc.yaml need not list a stage after its upstream)
        more = {s.name for s in stages if s.name in STAGES and picked & set(s.upstream)} - picked
        picked |= more
        grew = bool(more)
    return [s.name for s in stages if s.name in picked]


def build_definitions(root: str | Path | None = None) -> Definitions:
    root = Path(root).resolve() if root else default_root()
    stages = load_stages(root)
    jobs = [
        define_asset_job(
            "full_pipeline",
            AssetSelection.all(),
            description="every DVC stage in dependency order (DVC skips the unchanged ones)",
        )
    ]
    classifier = classifier_stages(stages)
    if classifier:
        jobs.append(
            define_asset_job(
                "classifier_only",
                AssetSelection.assets(*classifier),
                description=f"{' → '.join(classifier)} from the existing pretrained checkpoint",
            )
        )
    return Definitions(
        assets=[stage_asset(s) for s in stages],
        asset_checks=build_checks(stages),
        jobs=jobs,
        sensors=[dvc_lock_sensor],
        resources={
            "dvc": DvcWorkspace(root=str(root)),
            "wandb": WandbResource(),
            "pipes_subprocess_client": PipesSubprocessClient(),
        },
    )

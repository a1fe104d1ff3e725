"""The Dagster definitions, derived at load time from the stage registry that dvc.yaml is
generated from: every stage is an asset of the same name with the same dependencies."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, PipesSubprocessClient, define_asset_job

from gptpkg.pipeline import STAGES

from .assets import stage_asset
from .checks import build_checks
from .dvc_project import Stage, default_root, load_stages
from .resources import DvcWorkspace, WandbResource
from .sensors import dvc_lock_sensor


def classifier_stages(stages: list[Stage]) -> list[str]:
    """The stages of the `classifier_only` job, in registry order: the stage that trains the
    spam classifier (checkpoint `spam_classifier`) and the stages downstream of it
    (export_onnx, package)."""
    picked = {s.name for s in stages if STAGES[s.name].checkpoint == "spam_classifier"}
    grew = True
    while grew:  # downstream closure
        more = {s.name for s in stages if picked & set(s.upstream)} - picked
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

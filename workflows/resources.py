"""Resources: the DVC workspace a stage runs in and our own small W&B resource."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, Failure, MetadataValue
from pydantic import Field

from .dvc_project import default_root


class DvcBusy(RuntimeError):
    """Another DVC command (a `dvc repro` from a shell) holds the repository lock."""


class WandbResource(ConfigurableResource):
    """Weights & Biases settings for the training stages. They reach the stage process as
    WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY, which `gptpkg.loggers.wandb_from_env` reads
    over params.yaml: `wandb` (W&B settings never change a result, so DVC does not track them)."""

    mode: str = Field(default="offline", description="offline (no account; `wandb sync` later) | online | disabled")
    project: str = Field(default="gptpkg", description="W&B project")
    entity: str = Field(default="", description="W&B entity (team or user); empty = your default")

    def env(self) -> dict[str, str]:
        if self.mode not in ("offline", "online", "disabled"):
            raise Failure(f"resource wandb: mode must be offline|online|disabled, got {self.mode!r}")
        env = {"WANDB_MODE": self.mode, "WANDB_PROJECT": self.project}
        if self.entity:
            env["WANDB_ENTITY"] = self.entity
        return env

    def run_link(self, run_path: str) -> MetadataValue:
        """Online: entity/project/run_id -> a link to the run page; offline: the local run folder."""
        if self.mode == "online" and run_path.count("/") == 2 and not os.path.isabs(run_path):
            entity, project, run_id = run_path.split("/")
            return MetadataValue.url(f"https://wandb.ai/{entity}/{project}/runs/{run_id}")
        return MetadataValue.path(run_path)


class DvcWorkspace(ConfigurableResource):
    """The DVC workspace the stages run in, and the params selection of this run.

    `profile` and `set` are the CLI's `--profile` / `--set`: before a stage runs they are
    written into the workspace's params.yaml (`gptpkg profile NAME --set k=v`, comments kept,
    every changed key logged), so dvc.lock records the values the stage really ran with and
    `dvc status` agrees. With neither given, params.yaml is not touched."""

    root: str = Field(default="", description="DVC workspace (empty: $GPTPKG_DVC_ROOT or the repository root)")
    profile: str = Field(default="", description="params profile (profiles/NAME.yaml) to apply before the stage")
    set: list[str] = Field(default_factory=list, description="SECTION.KEY=VALUE overrides, applied after the profile")

    @property
    def path(self) -> Path:
        return Path(self.root).resolve() if self.root else default_root()

    def params(self):
        """The workspace's params.yaml, parsed and checked (gptpkg.config.Params)."""
        from gptpkg.config import ConfigError, load_params

        try:
            return load_params(self.path / "params.yaml")
        except ConfigError as e:
            raise Failure(f"{self.path / 'params.yaml'}: {e}") from None

    def apply_params(self) -> list[str]:
        """Write this run's profile / overrides into params.yaml; returns the changed keys."""
        if not self.profile and not self.set:
            return []
        from gptpkg.config import ConfigError
        from gptpkg.dvc_yaml import apply_profile

        try:
            return apply_profile(self.path / "params.yaml", self.profile or None, list(self.set))
        except ConfigError as e:
            raise Failure(f"run config (profile={self.profile!r}, set={list(self.set)}): {e}") from None

    def command(self, *args: str) -> list[str]:
        """`dvc <args>` with this environment's DVC."""
        return [sys.executable, "-m", "dvc", *args]

    def env(self) -> dict[str, str]:
        """The stage commands find this environment's `gptpkg` and `dvc` first on PATH."""
        return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

    def status(self, *targets: str) -> dict[str, Any]:
        """`dvc status --json [targets]`: {stage: [changes]} for every stage DVC would rerun.
        Raises DvcBusy while another DVC command holds the repository lock."""
        p = subprocess.run(
            self.command("status", "--json", *targets),
            cwd=self.path,
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            text = (p.stderr or p.stdout).strip()
            if "lock" in text.lower():
                raise DvcBusy(text)
            raise Failure(f"`dvc status --json` failed in {self.path} (exit {p.returncode}):\n{text}")
        # keys can be addressed relative to the cwd ("dvc.yaml:prepare"): keep the stage name
        return {k.rsplit(":", 1)[-1]: v for k, v in (json.loads(p.stdout or "{}") or {}).items()}

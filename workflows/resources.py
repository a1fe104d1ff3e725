"""Resources: the DVC workspace a stage runs in and our own small W&B resource."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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

    `profile` and `set` are the CLI's `--profile` / `--set`, for this run only: while a
    stage runs they are written into the workspace's params.yaml (the same code as `gptpkg
    profile NAME --set k=v`, comments kept), because DVC reads only that file and dvc.lock
    must record the values the stage ran with; afterwards params.yaml gets its bytes back.
    So `dvc status` then calls the stage changed (its params differ from params.yaml) until
    `dvc repro` runs it with the file's values. With neither given, params.yaml is not touched."""

    root: str = Field(default="", description="DVC workspace (empty: $GPTPKG_DVC_ROOT or the repository root)")
    profile: str = Field(default="", description="params profile (profiles/NAME.yaml) for this run's stages")
    set: list[str] = Field(
        default_factory=list, description="SECTION.KEY=VALUE overrides for this run's stages, after the profile"
    )

    @property
    def path(self) -> Path:
        return Path(self.root).resolve() if self.root else default_root()

    def params(self):
        """This run's params: the workspace's params.yaml with the run's profile and
        overrides, parsed and checked (gptpkg.config.Params)."""
        from gptpkg.config import ConfigError, load_params

        try:
            return load_params(self.path / "params.yaml", list(self.set), self.profile or None)
        except ConfigError as e:
            raise Failure(f"{self.path / 'params.yaml'} with the run config: {e}") from None

    @contextmanager
    def run_params(self) -> Iterator[list[str]]:
        """params.yaml holds this run's profile and overrides inside the block (yields the
        changed keys), and its own bytes again after it, however the block ends."""
        if not self.profile and not self.set:
            yield []
            return
        from gptpkg.config import ConfigError
        from gptpkg.dvc_yaml import apply_profile
        from gptpkg.files import atomic_write_bytes

        # apply_profile regenerates dvc.yaml with params.yaml: both get their bytes back.
        file = self.path / "params.yaml"
        originals = {f: f.read_bytes() for f in (file, self.path / "dvc.yaml") if f.is_file()}
        try:
            changed = apply_profile(file, self.profile or None, list(self.set))
        except ConfigError as e:
            raise Failure(f"run config (profile={self.profile!r}, set={list(self.set)}): {e}") from None
        try:
            yield changed
        finally:
            if changed:
                for f, data in originals.items():
                    atomic_write_bytes(f, data)

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

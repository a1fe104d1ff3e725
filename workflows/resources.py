"""Resources: the DVC workspace a stage runs in, our own small W&B resource, and the
quality gates the asset checks compare against."""

import collections
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource, Failure, MetadataValue
from pydantic import Field

from .dvc_project import default_root

LOCK_NAME = "gptpkg-dagster.lock"  # in <root>/.dvc/tmp, beside DVC's own repo lock


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


class QualityGates(ConfigurableResource):
    """Thresholds of the ERROR-severity asset checks."""

    spam_accuracy_floor: float = Field(default=0.8, description="finetune_spam test accuracy must be above this")


class DvcWorkspace(ConfigurableResource):
    """The DVC workspace the stages run in, and the params selection of this run.

    `profile` and `set` are the CLI's `--profile` / `--set`: before a stage runs they are
    written into the workspace's params.yaml (`gptpkg profile NAME --set k=v`, comments kept,
    every changed key logged), so dvc.lock records the values the stage really ran with and
    `dvc status` agrees. With neither given, params.yaml is not touched."""

    root: str = Field(default="", description="DVC workspace (empty: $GPTPKG_DVC_ROOT or the repository root)")
    profile: str = Field(default="", description="params profile (profiles/NAME.yaml) to apply before the stage")
    set: list[str] = Field(default_factory=list, description="SECTION.KEY=VALUE overrides, applied after the profile")
    lock_timeout_s: float = Field(default=6 * 3600.0, description="how long a stage waits for the workspace lock")

    @property
    def path(self) -> Path:
        return Path(self.root).resolve() if self.root else default_root()

    @contextmanager
    def locked(self, log: Callable[[str], None] | None = None, wait: bool = True) -> Iterator[bool]:
        """Hold the workspace lock (an flock, so it works across the run's step processes
        and across runs): DVC takes a repo lock and fails rather than waits."""
        lock_dir = self.path / ".dvc" / "tmp"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / LOCK_NAME, "a+") as f:
            deadline = time.monotonic() + self.lock_timeout_s
            told = False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    if time.monotonic() > deadline:
                        raise Failure(
                            f"DVC workspace {self.path} stayed locked for {self.lock_timeout_s:.0f} s "
                            f"({lock_dir / LOCK_NAME}); is another stage stuck?"
                        ) from None
                    if log and not told:
                        log(f"waiting for the DVC workspace lock ({lock_dir / LOCK_NAME}): another stage is running")
                        told = True
                    time.sleep(0.5)
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def apply_params(self) -> list[str]:
        """Write this run's profile / overrides into params.yaml; returns the changed keys."""
        if not self.profile and not self.set:
            return []
        from gptpkg.config import ConfigError, apply_profile

        try:
            return apply_profile(self.path / "params.yaml", self.profile or None, list(self.set))
        except ConfigError as e:
            raise Failure(f"run config (profile={self.profile!r}, set={list(self.set)}): {e}") from None

    def run(self, args: list[str], env: dict[str, str], log: Callable[[str], None]) -> list[str]:
        """Run `dvc <args>` in the workspace, streaming every output line to `log`.
        Returns the output lines; raises Failure carrying the stage's own error on a non-zero exit."""
        full_env = {
            **os.environ,
            **env,
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        cmd = [sys.executable, "-m", "dvc", *args]
        log(f"$ dvc {' '.join(args)}    (in {self.path})")
        lines: list[str] = []
        tail: collections.deque[str] = collections.deque(maxlen=60)
        proc = subprocess.Popen(
            cmd, cwd=self.path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            if line.strip():
                log(line)
        rc = proc.wait()
        if rc != 0:
            errors = [ln.strip() for ln in lines if "error:" in ln.lower() or ln.startswith("ERROR")]
            reason = "\n".join(errors) or "\n".join(list(tail)[-5:])
            raise Failure(
                description=f"`dvc {' '.join(args)}` failed (exit {rc}):\n{reason}",
                metadata={
                    "log tail": MetadataValue.text("\n".join(tail)),
                    "workspace": MetadataValue.path(str(self.path)),
                },
            )
        return lines

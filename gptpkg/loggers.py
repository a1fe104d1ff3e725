"""Metric loggers: a four-method interface with stdout and W&B backends.

W&B is reached only through `WandbLogger`, which imports wandb lazily, so the library
works without it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_table(
        self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> None: ...
    def log_artifact(
        self,
        path: str | Path,
        name: str,
        type: str,
        aliases: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    def log(self, metrics, step):
        pass

    def log_table(self, name, columns, rows, step=None):
        pass

    def log_artifact(self, path, name, type, aliases=(), metadata=None):
        pass

    def finish(self):
        pass


# Keys of the rows `fit` logs after every optimizer step (between evals): W&B plots them,
# the console skips them (one line per eval is enough there).
STEP_KEYS = frozenset({"step_loss", "lr"})


class StdoutLogger(NullLogger):
    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr

    def log(self, metrics, step):
        if set(metrics) <= STEP_KEYS:
            return
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        print(f"[step {step}] " + " ".join(parts), file=self.stream, flush=True)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MultiLogger(NullLogger):
    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, metrics, step):
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_table(self, name, columns, rows, step=None):
        for lg in self.loggers:
            lg.log_table(name, columns, rows, step)

    def log_artifact(self, path, name, type, aliases=(), metadata=None):
        for lg in self.loggers:
            lg.log_artifact(path, name, type, aliases, metadata)

    def finish(self):
        for lg in self.loggers:
            lg.finish()


class WandbLogger(NullLogger):
    """One W&B run. `mode` is offline by default: no account needed, `wandb sync` later."""

    def __init__(
        self,
        project: str,
        name: str,
        mode: str = "offline",
        entity: str | None = None,
        dir: str | Path | None = None,
        group: str | None = None,
        job_type: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        import wandb

        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb mode must be online|offline|disabled, got {mode!r}")
        self._wandb = wandb
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity or None,
            name=name,
            mode=mode,
            dir=str(dir) if dir else None,
            group=group,
            job_type=job_type,
            config=config,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.mode = mode

    @property
    def run_path(self) -> str:
        """entity/project/run_id online; the local run folder offline."""
        if self.mode == "online":
            return "/".join(str(x) for x in (self.run.entity, self.run.project, self.run.id))
        return str(Path(self.run.dir).parent) if self.run.dir else ""

    def where(self) -> str:
        if self.mode == "online":
            return f"W&B run: {self.run.url}"
        if self.mode == "offline":
            return f"W&B offline run in {self.run_path}; upload it with: wandb sync {self.run_path}"
        return "W&B disabled"

    def log(self, metrics, step):
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def log_table(self, name, columns, rows, step=None):
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.run.log({name: table}, step=step)

    def log_artifact(self, path, name, type, aliases=(), metadata=None):
        """`path` (file or folder) as a new version of artifact `name`; W&B adds `latest`."""
        art = self._wandb.Artifact(name=name, type=type, metadata=metadata)
        path = Path(path)
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art, aliases=["latest", *aliases])

    def finish(self):
        self.run.finish()


def wandb_from_env(defaults: dict[str, Any]) -> dict[str, Any]:
    """W&B settings: params values overridden by WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY."""
    out = dict(defaults)
    for key, env in (("mode", "WANDB_MODE"), ("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")):
        if os.environ.get(env):
            out[key] = os.environ[env]
    return out

"""What Dagster needs to know about the pipeline: its stages, read from the stage registry
that dvc.yaml is generated from (`gptpkg.pipeline`), with their paths resolved from the
workspace's params.yaml, and the hashes `dvc.lock` records. Nothing here runs a stage."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptpkg.config import load_params
from gptpkg.dvc_yaml import CMD, code_deps
from gptpkg.pipeline import planned, resolve, upstream

ROOT_ENV = "GPTPKG_DVC_ROOT"


class DvcProjectError(RuntimeError):
    pass


def default_root() -> Path:
    """The DVC workspace: $GPTPKG_DVC_ROOT, else the repository this package lives in."""
    env = os.environ.get(ROOT_ENV)
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    upstream: tuple[str, ...]  # stages whose outputs this stage reads (registry order)
    deps: tuple[str, ...]  # paths relative to the DVC root
    outs: tuple[str, ...]
    metrics: tuple[str, ...]  # metrics outs (JSON)
    plots: tuple[str, ...]  # plots outs (PNG images)
    code_version: str  # hash of cmd + content of the gptpkg modules the stage can run
    group: str

    def metrics_file(self, suffix: str = "") -> str | None:
        """metrics/<stage>.json (or the first metrics out); metrics/runtime/<stage>.json with suffix='runtime'."""
        want = f"{suffix}/{self.name}.json" if suffix else f"/{self.name}.json"
        for m in self.metrics:
            if ("/" + m).endswith(want) and (suffix or "/runtime/" not in "/" + m):
                return m
        return None


def _hash_file(h: hashlib._Hash, p: Path) -> None:
    h.update(p.read_bytes() if p.is_file() else b"<missing>")


def load_stages(root: str | Path) -> list[Stage]:
    """The pipeline stages that `root/params.yaml` describes, in registry order (dvc.yaml's:
    `gptpkg.pipeline.planned`), their paths resolved from its `paths`, relative to the DVC root."""
    root = Path(root).resolve()
    params_file = root / "params.yaml"
    if not params_file.is_file():
        raise DvcProjectError(f"no params.yaml in the DVC workspace {root} (set ${ROOT_ENV} to the project root)")
    params = load_params(params_file)
    paths = params.paths
    stages = planned(params)

    def rel(template: str) -> str:
        return Path(os.path.normpath(resolve(template, paths))).as_posix()

    out = []
    for s in stages.values():
        cmd = CMD.format(name=s.name)
        code = code_deps(s)
        # params are DVC's business (per key, in dvc.lock): a profile written for one run
        # must not make every asset's code version differ from the one it ran with
        h = hashlib.sha256(cmd.encode())
        for f in code:
            h.update(f.encode())
            _hash_file(h, root / f)
        metrics = tuple(rel(m) for m in s.metrics)
        plots = tuple(rel(p) for p in s.images)
        out.append(
            Stage(
                s.name,
                cmd,
                upstream(s, stages),
                tuple(rel(d) for d in s.deps) + tuple(code),
                tuple(rel(o.path) for o in s.outs) + metrics + plots,
                metrics,
                plots,
                h.hexdigest()[:16],
                s.group,
            )
        )
    return out


def read_lock(root: str | Path) -> dict[str, Any]:
    """`dvc.lock` stages ({} when the pipeline never ran)."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data.get("stages", {}) or {}


def _entry_hash(parts: list) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def outs_version(lock_entry: dict[str, Any] | None) -> str | None:
    """The data version of a stage: a hash of the DVC hashes (md5) of its outputs in dvc.lock."""
    if not lock_entry or not lock_entry.get("outs"):
        return None
    return _entry_hash(sorted((o["path"], o.get("md5") or o.get("hash") or "") for o in lock_entry["outs"]))


def lock_entry_version(lock_entry: dict[str, Any] | None) -> str | None:
    """A hash of the whole dvc.lock entry (deps, params, outs): changes whenever DVC ran the stage
    with anything different."""
    if not lock_entry:
        return None
    return _entry_hash(yaml.safe_dump(lock_entry, sort_keys=True))


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

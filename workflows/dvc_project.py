"""What Dagster needs to know about the DVC project, read from DVC itself: the stages of
`dvc.yaml` (templated paths resolved by DVC), their dependency graph, and the hashes
`dvc.lock` records. Nothing here runs a stage."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptpkg.stages import STAGES

DEFAULT_GROUP = "pipeline"  # a dvc.yaml stage the registry (gptpkg.stages.STAGES) does not know

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
    upstream: tuple[str, ...]  # stages whose outputs this stage reads (dvc.yaml order)
    deps: tuple[str, ...]  # paths relative to the DVC root
    outs: tuple[str, ...]
    metrics: tuple[str, ...]  # metrics outs (JSON)
    plots: tuple[str, ...]  # plots outs (PNG images first)
    code_version: str  # hash of cmd + content of the file deps no stage produces (the gptpkg modules)
    group: str = field(default=DEFAULT_GROUP)

    def metrics_file(self, suffix: str = "") -> str | None:
        """metrics/<stage>.json (or the first metrics out); metrics/runtime/<stage>.json with suffix='runtime'."""
        want = f"{suffix}/{self.name}.json" if suffix else f"/{self.name}.json"
        for m in self.metrics:
            if ("/" + m).endswith(want) and (suffix or "/runtime/" not in "/" + m):
                return m
        return None


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _hash_path(h: hashlib._Hash, p: Path) -> None:
    if p.is_file():
        h.update(p.read_bytes())
    elif p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
            h.update(str(f.relative_to(p)).encode())
            h.update(f.read_bytes())
    else:
        h.update(b"<missing>")


def load_stages(root: str | Path) -> list[Stage]:
    """The pipeline stages of `root/dvc.yaml`, in dvc.yaml order, via DVC's own parser."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root).resolve()
    if not (root / "dvc.yaml").is_file():
        raise DvcProjectError(f"no dvc.yaml in the DVC workspace {root} (set ${ROOT_ENV} to the project root)")
    repo = Repo(str(root))
    try:
        stages = [
            s for s in repo.index.stages if getattr(s, "name", None) and Path(s.path).resolve() == root / "dvc.yaml"
        ]
        graph = repo.index.graph
        raw = []
        for s in stages:
            rel = lambda o: Path(os.path.relpath(o.fs_path, root)).as_posix()  # noqa: E731
            outs = [o for o in s.outs]
            upstream = {d.name for d in graph.successors(s) if getattr(d, "name", None)}
            # params are DVC's business (per key, in dvc.lock): a profile written for one run
            # must not make every asset's code version differ from the one it ran with
            files = [d for d in s.deps if not isinstance(d, ParamsDependency)]
            raw.append(
                (
                    s.name,
                    s.cmd if isinstance(s.cmd, str) else " && ".join(s.cmd),
                    upstream,
                    [rel(d) for d in files],
                    [rel(o) for o in outs],
                    [rel(o) for o in outs if o.metric],
                    [rel(o) for o in outs if o.plot],
                )
            )
    finally:
        repo.close()
    order = [r[0] for r in raw]
    produced = [o for r in raw for o in r[4]]
    out = []
    for name, cmd, upstream, deps, outs, metrics, plots in raw:
        h = hashlib.sha256(cmd.encode())
        for d in sorted(deps):
            if not any(_inside(d, o) or _inside(o, d) for o in produced):
                h.update(d.encode())
                _hash_path(h, root / d)
        plots = sorted(plots, key=lambda p: not p.endswith(".png"))
        out.append(
            Stage(
                name,
                cmd,
                tuple(n for n in order if n in upstream),
                tuple(deps),
                tuple(outs),
                tuple(metrics),
                tuple(plots),
                h.hexdigest()[:16],
                STAGES[name].group if name in STAGES else DEFAULT_GROUP,
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

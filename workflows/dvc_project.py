"""What Dagster needs to know about the DVC project, read from the files DVC documents:
the stages of `dvc.yaml` (with `${...}` templates from params.yaml), their dependency
graph, and the hashes `dvc.lock` records. Nothing here runs a stage."""

from __future__ import annotations

import hashlib
import os
import re
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


TEMPLATE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")  # DVC templating: ${paths.raw}


def _lookup(params: dict, key: str, where: str) -> str:
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DvcProjectError(f"{where}: ${{{key}}} is not a key of params.yaml")
        value = value[part]
    if isinstance(value, (dict, list)):
        raise DvcProjectError(f"{where}: ${{{key}}} is a {type(value).__name__}, expected a value")
    return str(value)


def _paths(entries: list | None, params: dict, where: str) -> list[str]:
    """The paths of a dvc.yaml deps/outs/metrics/plots list (a path, or {path: options}),
    templates resolved from params.yaml as DVC does, posix and relative to the root."""
    out = []
    for e in entries or []:
        raw = next(iter(e)) if isinstance(e, dict) else e
        if not isinstance(raw, str):
            raise DvcProjectError(f"{where}: expected a path or {{path: options}}, got {e!r}")
        path = TEMPLATE.sub(lambda m: _lookup(params, m.group(1), where), raw)
        out.append(Path(os.path.normpath(path)).as_posix())
    return out


def load_stages(root: str | Path) -> list[Stage]:
    """The pipeline stages of `root/dvc.yaml`, in dvc.yaml order. Read as the YAML file DVC
    documents (no DVC internals): `${key}` templates come from params.yaml, and a stage is
    upstream of another when one of its outputs is (or holds, or lies in) one of its deps."""
    root = Path(root).resolve()
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise DvcProjectError(f"no dvc.yaml in the DVC workspace {root} (set ${ROOT_ENV} to the project root)")
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    params_file = root / "params.yaml"
    params = (yaml.safe_load(params_file.read_text()) or {}) if params_file.is_file() else {}
    if "vars" in doc:
        raise DvcProjectError(f"{dvc_yaml}: top-level `vars` is not supported here; templates read params.yaml")
    raw = []
    for name, st in (doc.get("stages") or {}).items():
        where = f"{dvc_yaml}: stage {name}"
        unsupported = sorted({"foreach", "matrix", "wdir", "vars"} & set(st))
        if unsupported:
            raise DvcProjectError(f"{where}: {unsupported} not supported (one asset per plain stage)")
        cmd = st.get("cmd", "")
        metrics = _paths(st.get("metrics"), params, where)
        plots = _paths(st.get("plots"), params, where)
        outs = _paths(st.get("outs"), params, where) + metrics + plots
        deps = _paths(st.get("deps"), params, where)
        raw.append((name, cmd if isinstance(cmd, str) else " && ".join(cmd), deps, outs, metrics, plots))
    produced = {name: outs for name, _, _, outs, _, _ in raw}
    every_out = [o for outs in produced.values() for o in outs]
    out = []
    for name, cmd, deps, outs, metrics, plots in raw:
        upstream = tuple(
            n for n, o in produced.items() if n != name and any(_inside(d, x) or _inside(x, d) for d in deps for x in o)
        )
        # params are DVC's business (per key, in dvc.lock): a profile written for one run
        # must not make every asset's code version differ from the one it ran with
        h = hashlib.sha256(cmd.encode())
        for d in sorted(deps):
            if not any(_inside(d, o) or _inside(o, d) for o in every_out):
                h.update(d.encode())
                _hash_path(h, root / d)
        out.append(
            Stage(
                name,
                cmd,
                upstream,
                tuple(deps),
                tuple(outs),
                tuple(metrics),
                tuple(sorted(plots, key=lambda p: not p.endswith(".png"))),
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

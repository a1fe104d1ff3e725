"""`gptpkg promote [TAG]`: the one step that changes what the service serves.

`package` stores every export under a versioned tag (`gptpkg-spam-classifier:fp32-<sha12>`)
and nothing else: an experiment or a rerun adds a version and serves nothing new. Promoting
a version copies it to the model `<name>-served` under the same version, as that name's
newest entry, so `gptpkg-spam-classifier-served:latest` (the service's default model) is
the promoted one; promoting an older version again rolls back. The same step moves the
W&B alias `served` to that ONNX artifact version and adds the git tag
`spam-classifier-onnx#served#N` (GTO's stage tag, which `dvc artifacts get --stage served`
and `dvc.api.artifacts_show(..., stage="served")` resolve) on the commit that built it.
bentoml and wandb are imported here only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

from .errors import GptpkgError
from .onnx_export import ONNX_ARTIFACT

SERVED_SUFFIX = "-served"  # the model name the service reads: <package.model_name>-served
SERVED = "served"  # the W&B alias and the GTO stage of the promoted version


class PromoteError(GptpkgError):
    pass


def served_name(model_name: str) -> str:
    return model_name + SERVED_SUFFIX


def _record(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PromoteError(
            f"{path}: no record of a packaged model; run `dvc repro package`, or name a tag from `bentoml models list`"
        ) from None


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def _committed(record: Path, digest: str) -> bool:
    """Whether HEAD's dvc.lock records this model: the `package` record there (by its md5)
    is the workspace's, and that record is of this ONNX file (by its sha256)."""
    import hashlib

    import yaml

    head = _git("show", "HEAD:./dvc.lock")
    try:
        stages = (yaml.safe_load(head.stdout) or {}).get("stages", {}) if head.returncode == 0 else {}
        data = record.read_bytes()
        same = json.loads(data).get("sha256") == digest
    except (OSError, ValueError, yaml.YAMLError):
        return False
    md5 = hashlib.md5(data).hexdigest()
    outs = [o for e in stages.values() for o in e.get("outs", [])]
    return same and any(Path(o["path"]) == record and o.get("md5") == md5 for o in outs)


def _tag_commit(record: Path, digest: str, served: str) -> str:
    """Tag HEAD when its dvc.lock records this model; the line saying what happened."""
    if not _committed(record, digest):
        return (
            f"git: no tag: HEAD's dvc.lock does not record this model in {record} (commit the run "
            "that packaged it, then promote again to tag it)"
        )
    prefix = f"{ONNX_ARTIFACT}#{SERVED}#"
    n = len(_git("tag", "--list", prefix + "*").stdout.split()) + 1
    tag = f"{prefix}{n}"
    p = _git("tag", "-a", tag, "-m", f"promote {served}", "HEAD")
    if p.returncode:
        raise PromoteError(f"git tag {tag}: {p.stderr.strip()}")
    return f"git: tagged HEAD {tag} (`dvc artifacts get . {ONNX_ARTIFACT} --stage {SERVED}`)"


def _alias(params, onnx_file: str, digest: str, version: str) -> str:
    """Move the W&B alias when the workspace export is this model; the line saying so."""
    from .loggers import WandbLogger, wandb_from_env
    from .raw import sha256_of

    folder = Path(params.paths.onnx)
    wcfg = wandb_from_env(params.wandb.model_dump())
    if wcfg["mode"] == "disabled":
        return "W&B: disabled"
    if not (folder / onnx_file).is_file() or sha256_of(folder / onnx_file) != digest:
        return (
            f"W&B: alias not moved: {folder} holds another export (`git checkout` its commit and "
            "`dvc checkout export_onnx`, then promote again)"
        )
    wb = WandbLogger(
        project=wcfg["project"],
        entity=wcfg["entity"] or None,
        name="promote",
        mode=wcfg["mode"],
        dir=Path(params.paths.wandb).resolve(),
        job_type="promote",
        config={"promote": {"version": version}},
    )
    try:  # the same files as export_onnx logged: W&B keeps one version and moves the alias
        wb.log_artifact(folder, ONNX_ARTIFACT, "model", aliases=[version, SERVED])
    finally:
        wb.finish()
    return f"W&B: {ONNX_ARTIFACT}:{version} aliased {SERVED!r}; {wb.where()}"


def promote(params, tag: str | None = None) -> list[str]:
    """Promote BentoML model `tag` (default: the one this workspace packaged last); returns
    one line per thing it changed."""
    try:
        import bentoml
    except ImportError:
        raise PromoteError("promote needs BentoML: pip install 'gptpkg[serving]'") from None

    record = Path(params.paths.bento_model)
    tag = tag or _record(record).get("bento_model") or ""
    try:
        src = bentoml.models.get(tag)
    except (bentoml.exceptions.NotFound, ValueError, bentoml.exceptions.BentoMLException):
        raise PromoteError(
            f"BentoML model {tag!r} is not in the store: `bentoml models list {params.package.model_name}` "
            "lists the packaged versions"
        ) from None
    if src.tag.name.endswith(SERVED_SUFFIX):
        raise PromoteError(
            f"{src.tag} is already a served copy; give the packaged tag ({src.tag.name.removesuffix(SERVED_SUFFIX)}:VERSION)"
        )
    served = f"{served_name(src.tag.name)}:{src.tag.version}"
    # a version promoted before is recreated, so it is the newest (`latest`) again
    with contextlib.suppress(bentoml.exceptions.NotFound):
        bentoml.models.delete(served)
    meta = {**src.info.metadata, "promoted_from": str(src.tag)}
    with bentoml.models.create(served, labels=dict(src.info.labels), metadata=meta) as m:
        for f in Path(src.path).iterdir():
            if f.name != "model.yaml":  # BentoML writes the new entry's own
                (shutil.copytree if f.is_dir() else shutil.copyfile)(f, Path(m.path) / f.name)
    digest = meta.get("sha256", "")
    lines = [f"BentoML: {served} is now {served_name(src.tag.name)}:latest, what the service serves"]
    lines.append(_alias(params, meta.get("onnx_file", ""), digest, src.tag.version))
    lines.append(
        _tag_commit(record, digest, served) if _git("rev-parse", "HEAD").returncode == 0 else "git: no repository"
    )
    return lines

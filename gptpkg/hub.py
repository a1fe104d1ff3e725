"""OpenAI's GPT-2 weights obtained through huggingface_hub, verified, into one folder.

`obtain_weights` fills a folder with `config.json` and `model.safetensors` (or, for a
repository without safetensors, `pytorch_model.bin`) of `openai-community/<model>`, or
copies them from a local folder. The Hub path goes through huggingface_hub's own cache
(`HF_HOME` / `HF_HUB_CACHE`), so a second run downloads nothing, and honours its
environment as its users expect: `HF_ENDPOINT` (a mirror), `HF_TOKEN`, `HF_HUB_OFFLINE`
(the cache only). Each file is checked against the hash the Hub names it by (the ETag:
the sha256 of an LFS file, the git blob sha1 of any other), so a corrupt download is an
error that writes nothing and drops the bad copy from the cache; the safetensors header
must then match config.json. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import GptpkgError
from .files import atomic_dir

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
ORG = "openai-community"
CONFIG, SAFETENSORS, TORCH_BIN = "config.json", "model.safetensors", "pytorch_model.bin"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


class HubError(GptpkgError, RuntimeError):
    pass


def repo_id(model: str) -> str:
    return f"{ORG}/{model}"


def _hash(path: Path, algorithm: str) -> str:
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1()
    if algorithm == "git-sha1":  # git's blob id: sha1 of "blob <size>\0" + content
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_files(repo: str, commit: str) -> dict[str, Path]:
    """{file name: its blob} of `repo` at `commit` in the huggingface_hub cache."""
    from huggingface_hub import scan_cache_dir

    for info in scan_cache_dir().repos:
        if info.repo_id == repo and info.repo_type == "model":
            for rev in info.revisions:
                if rev.commit_hash == commit:
                    return {f.file_name: Path(f.blob_path) for f in rev.files}
    return {}


def _verify_cached(repo: str, snapshot: Path, names: list[str]) -> dict[str, str]:
    """Each file of the snapshot against the hash its blob is named by; a mismatch drops
    the revision from the cache (so the next run downloads it again) and raises.
    Returns {name: the verified hash}."""
    from huggingface_hub import scan_cache_dir

    commit = snapshot.name
    blobs = _cached_files(repo, commit)
    verified = {}
    for name in names:
        blob = blobs.get(name)
        etag = blob.name if blob is not None else ""
        algorithm = "sha256" if _SHA256.fullmatch(etag) else "git-sha1" if _SHA1.fullmatch(etag) else None
        if algorithm is None:
            raise HubError(
                f"{snapshot / name}: not in the huggingface_hub cache under a content hash; delete it and rerun"
            )
        got = _hash(snapshot / name, algorithm)
        if got != etag:
            scan_cache_dir().delete_revisions(commit).execute()
            raise HubError(
                f"{repo}@{commit[:12]}/{name}: {algorithm} {got} does not match the Hub's {etag}: "
                f"corrupt download, removed from the huggingface_hub cache; nothing written, rerun to download it again"
            )
        verified[name] = f"{algorithm}:{got}"
    return verified


def _snapshot(repo: str, revision: str, names: list[str]) -> Path:
    from huggingface_hub import constants as hf
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=names))
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo} not found at {hf.ENDPOINT} (404; $HF_ENDPOINT sets the server, $HF_TOKEN the token): "
            f"expected one of {[repo_id(s) for s in SIZES]}"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: no revision {revision!r} at {hf.ENDPOINT} (params.weights.revision)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if hf.HF_HUB_OFFLINE else f"{hf.ENDPOINT} cannot be reached"
        raise HubError(
            f"{repo}@{revision}: {why} and the huggingface_hub cache {hf.HF_HUB_CACHE} lacks it: run once online "
            f"(or with HF_ENDPOINT set to a mirror), or place {CONFIG} + {SAFETENSORS} in a folder and set "
            f"params.weights.local_folder to it"
        ) from None


def from_hub(model: str, revision: str) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """The cached snapshot of `openai-community/<model>` at `revision` holding config.json
    and model.safetensors (pytorch_model.bin where the repository has no safetensors),
    verified. Returns (snapshot folder, {file: hash}, record)."""
    repo = repo_id(model)
    snap = _snapshot(repo, revision, [CONFIG, SAFETENSORS])
    if not (snap / SAFETENSORS).is_file():
        snap = _snapshot(repo, revision, [CONFIG, TORCH_BIN])
    names = [n for n in (CONFIG, SAFETENSORS, TORCH_BIN) if (snap / n).is_file()]
    if names[:1] != [CONFIG] or len(names) < 2:
        raise HubError(f"{repo}@{revision}: expected {CONFIG} and {SAFETENSORS} (or {TORCH_BIN}), found {names}")
    hashes = _verify_cached(repo, snap, names[:2])
    return snap, hashes, {"source": "hub", "repo": repo, "revision": revision, "commit": snap.name}


def from_folder(folder: str | Path) -> tuple[Path, dict[str, str], dict[str, Any]]:
    folder = Path(folder)
    weights = SAFETENSORS if (folder / SAFETENSORS).is_file() else TORCH_BIN
    for name in (CONFIG, weights):
        if not (folder / name).is_file():
            raise HubError(
                f"params.weights.local_folder={str(folder)!r}: {name} missing (expected the Hugging Face gpt2 "
                f"files {CONFIG} + {SAFETENSORS})"
            )
    hashes = {n: "sha256:" + _hash(folder / n, "sha256") for n in (CONFIG, weights)}
    return folder, hashes, {"source": "local_folder", "folder": str(folder)}


def check_layout(folder: Path) -> dict[str, Any]:
    """config.json is a GPT-2 config and model.safetensors holds its tensors with their
    shapes (header only); returns the config's sizes."""
    try:
        cfg = json.loads((folder / CONFIG).read_text())
        dims = {k: int(cfg[k]) for k in ("vocab_size", "n_embd", "n_layer", "n_head")}
        dims["n_positions"] = int(cfg.get("n_positions", cfg.get("n_ctx")))
    except (ValueError, KeyError, TypeError) as e:
        raise HubError(f"{folder / CONFIG}: not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    if not (folder / SAFETENSORS).is_file():
        return dims
    from safetensors import safe_open

    try:
        with safe_open(str(folder / SAFETENSORS), framework="numpy") as f:
            keys = {k.removeprefix("transformer."): k for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
            expect = {"wte.weight": [dims["vocab_size"], dims["n_embd"]]}
            expect[f"h.{dims['n_layer'] - 1}.attn.c_attn.weight"] = [dims["n_embd"], 3 * dims["n_embd"]]
            for k, shape in expect.items():
                got = f.get_slice(keys[k]).get_shape() if k in keys else None
                if got != shape:
                    raise HubError(f"{folder / SAFETENSORS}: {k} has shape {got}, expected {shape} (from {CONFIG})")
    except HubError:
        raise
    except Exception as e:
        raise HubError(f"{folder / SAFETENSORS}: unreadable safetensors file: {e}") from None
    return dims


def obtain_weights(dest: str | Path, model: str, revision: str = "main", local_folder: str = "") -> dict[str, Any]:
    """Fill `dest` (replaced atomically, untouched on any error) with the GPT-2 files of
    `local_folder`, or else of the Hub repository `openai-community/<model>`. Returns the
    record: where they came from, each file's hash, the config's sizes."""
    if model not in SIZES:
        raise HubError(f"params.weights.model={model!r}: expected one of {list(SIZES)}")
    src, hashes, record = from_folder(local_folder) if local_folder else from_hub(model, revision)
    dims = check_layout(src)
    with atomic_dir(dest) as tmp:
        for name in hashes:
            shutil.copyfile(src / name, tmp / name)
    return {**record, "model": model, "files": hashes, **dims}

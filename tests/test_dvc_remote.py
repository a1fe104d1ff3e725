"""From this machine to the GPU machine, the DVC way: your corpus folder (`dvc add`) and
the prepared shards go to a DVC remote (`dvc push`) and come back in another clone
(`dvc pull`), byte for byte, as links into the cache (cache.type), not second copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout + proc.stderr


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_corpus_and_shards_travel_through_a_local_remote(tmp_path):
    repo, clone, remote = tmp_path / "here", tmp_path / "gpu-box", tmp_path / "remote"
    repo.mkdir()
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "profiles", repo / "profiles")
    shutil.copytree(ROOT / "gptpkg", repo / "gptpkg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    (repo / "data" / "corpus").mkdir(parents=True)
    (repo / "data" / "corpus" / "book.txt").write_text("It was a dark and stormy night.\n" * 200)
    (repo / "data" / "corpus" / "more.txt").write_text("Once upon a time there was a corpus.\n" * 200)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "test")
    sh(repo, "dvc", "add", "-q", "data/corpus")  # the README's step
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(repo, "dvc", "repro", "prepare")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "corpus and prepared shards")
    sh(repo, "dvc", "push")

    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull", "fetch", "prepare", "data/corpus.dvc")
    for folder in ("data/corpus", "data/processed"):
        assert digests(clone / folder) == digests(repo / folder), folder
    assert "corpus.train" in (clone / "metrics" / "prepare.json").read_text()
    status = sh(clone, "dvc", "status", "prepare")
    assert "changed" not in status and "deleted" not in status, status  # pretrain can run from here
    # a link into the clone's cache, not a second copy (a hardlink here; reflink on btrfs/xfs)
    shard = next((clone / "data" / "processed" / "corpus").glob("corpus.train.*.bin"))
    cached = [
        p for p in (clone / ".dvc" / "cache").rglob("*") if p.is_file() and p.stat().st_ino == shard.stat().st_ino
    ]
    assert cached or shard.stat().st_nlink == 1 and _reflinked(shard), "the shard is a copy of the cache's file"


def _reflinked(path: Path) -> bool:
    """Filesystems with reflinks share blocks, not inodes: nothing to assert there."""
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout
    return out.strip() in ("btrfs", "xfs")

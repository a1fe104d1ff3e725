"""The `weights` stage through the real huggingface_hub client against a local HTTP server
that answers as the Hub does (`HF_ENDPOINT`): download, cache hit, offline mode, a
corrupt file, a 404, a local folder. Each run is `gptpkg weights` in its own process, so
huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_TOKEN / HF_HUB_OFFLINE as it does for
a user."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "a1b2c3d4e5" * 4
TOKEN = "hf_local_test_token"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's read API for model repositories: `repos` maps a repo id to its files
    {name: bytes}; `corrupt` names repos whose safetensors bytes are served altered
    (same size, the true sha256 in the ETag). Every request is logged (method, path,
    Authorization header)."""

    def __init__(self, repos: dict[str, dict[str, bytes]], corrupt: set[str] = frozenset()):
        self.repos, self.corrupt, self.log = repos, set(corrupt), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.log.append((h.command, path, h.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:  # /api/models/{org}/{name}/(revision|tree)/{rev}
            repo, what = "/".join(parts[2:4]), parts[4] if len(parts) > 4 else ""
            if repo not in self.repos:
                return self.send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
            files = self.repos[repo]
            if what == "revision":
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]}
                return self.send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
            tree = [self.entry(n, d) for n, d in files.items()]
            return self.send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":  # /{org}/{name}/resolve/{rev}/{file}
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self.send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body)
            data = self.repos[repo].get(name)
            if data is None:
                return self.send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, body)
            lfs = name.endswith(".safetensors")
            etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
            if lfs:  # the Hub names LFS files by their sha256 in X-Linked-Etag
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            if lfs and repo in self.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            return self.send(h, 200, data, headers, body)
        self.send(h, 404, b"not found", {}, body)

    @staticmethod
    def entry(name: str, data: bytes) -> dict:
        e = {"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
        if name.endswith(".safetensors"):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    @staticmethod
    def send(h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def downloads(self) -> list[str]:
        return [p for m, p, _ in self.log if m == "GET" and "/resolve/" in p]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> tuple[Path, dict[str, bytes], torch.nn.Module]:
    """A tiny GPT-2 written by transformers in the Hub layout: config.json + model.safetensors."""
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("gpt2-files")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}, model


@pytest.fixture(scope="module")
def hub(gpt2_files):
    _, files, _ = gpt2_files
    server = FakeHub({"openai-community/gpt2": files, "openai-community/gpt2-medium": files})
    yield server
    server.server.shutdown()


def workspace(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def weights(ws: Path, hub: FakeHub, hf_home: Path, *sets: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    args = [sys.executable, "-m", "gptpkg.cli", "weights", "--no-progress"]
    args += [a for s in sets for a in ("--set", s)]
    return subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True, timeout=300)


def test_download_cache_hit_and_offline(hub, gpt2_files, tmp_path):
    from gptpkg.hf_weights import load_openai_gpt2

    src, files, hf_model = gpt2_files
    ws, hf_home = workspace(tmp_path), tmp_path / "hf"
    hub.log.clear()
    r = weights(ws, hub, hf_home)
    assert r.returncode == 0, r.stderr
    out = ws / "models" / "openai"
    assert {p.name for p in out.iterdir()} == set(files)
    assert all((out / n).read_bytes() == b for n, b in files.items())
    assert sorted(hub.downloads()) == sorted(f"/openai-community/gpt2/resolve/{COMMIT}/{n}" for n in files)
    # HF_TOKEN reaches the server with every request for the repository
    assert {a for _, p, a in hub.log if "openai-community" in p} == {f"Bearer {TOKEN}"}
    record = json.loads((ws / "metrics" / "weights.json").read_text())
    assert record["commit"] == COMMIT and record["n_layer"] == 2
    assert record["files"]["model.safetensors"] == "sha256:" + hashlib.sha256(files["model.safetensors"]).hexdigest()
    idx = torch.randint(0, 50257, (2, 12))  # the output is the model, exactly
    with torch.no_grad():
        torch.testing.assert_close(load_openai_gpt2(out).eval()(idx), hf_model(idx).logits, atol=1e-4, rtol=1e-4)

    # a second run (the output gone, as on a fresh clone) downloads nothing
    shutil.rmtree(out)
    hub.log.clear()
    assert weights(ws, hub, hf_home).returncode == 0
    assert hub.downloads() == [] and (out / "model.safetensors").read_bytes() == files["model.safetensors"]

    # offline with the cache: no request at all
    shutil.rmtree(out)
    hub.log.clear()
    r = weights(ws, hub, hf_home, offline=True)
    assert r.returncode == 0, r.stderr
    assert hub.log == [] and (out / "config.json").is_file()


def test_offline_with_an_empty_cache_says_what_to_place_where(hub, gpt2_files, tmp_path):
    src, files, _ = gpt2_files
    ws = workspace(tmp_path)
    hub.log.clear()
    r = weights(ws, hub, tmp_path / "empty-hf", offline=True)
    assert r.returncode == 1 and hub.log == []
    err = r.stderr.strip().splitlines()[-1]
    assert "HF_HUB_OFFLINE is set" in err and "openai-community/gpt2@main" in err
    assert "config.json + model.safetensors" in err and "params.weights.local_folder" in err
    assert not (ws / "models" / "openai").exists()
    # a local folder still works, offline and without the cache
    r = weights(ws, hub, tmp_path / "empty-hf", f"weights.local_folder={src}", offline=True)
    assert r.returncode == 0, r.stderr
    assert (ws / "models" / "openai" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert json.loads((ws / "metrics" / "weights.json").read_text())["source"] == "local_folder"


def test_corrupt_download_writes_nothing_and_leaves_no_bad_cache(hub, tmp_path):
    from huggingface_hub import scan_cache_dir

    ws, hf_home = workspace(tmp_path), tmp_path / "hf"
    out = ws / "models" / "openai"
    out.mkdir(parents=True)
    (out / "config.json").write_text("earlier output")
    hub.corrupt.add("openai-community/gpt2-medium")
    try:
        r = weights(ws, hub, hf_home, "weights.model=gpt2-medium")
    finally:
        hub.corrupt.clear()
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert "openai-community/gpt2-medium@" in err and "model.safetensors: sha256" in err and "corrupt" in err
    assert (out / "config.json").read_text() == "earlier output" and len(list(out.iterdir())) == 1
    assert not [r for r in scan_cache_dir(hf_home / "hub").repos if r.revisions]
    # the next run downloads it again, intact
    r = weights(ws, hub, hf_home, "weights.model=gpt2-medium")
    assert r.returncode == 0, r.stderr


def test_unknown_repository_is_a_404_naming_the_server(hub, tmp_path):
    ws = workspace(tmp_path)
    r = weights(ws, hub, tmp_path / "hf", "weights.model=gpt2-xl")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert f"openai-community/gpt2-xl not found at {hub.url} (404" in err
    assert not (ws / "models" / "openai").exists()

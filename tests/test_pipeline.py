"""The DVC pipeline end to end: the project copied into a temp git + DVC repository, the
tiny profile written into params.yaml, then real `dvc repro`, `dvc exp run`, `dvc metrics
show`, `dvc plots show`, and the W&B offline run files read back."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptpkg.config import load_params
from gptpkg.pipeline import STAGES as REGISTRY
from gptpkg.pipeline import planned

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = list(planned(load_params(ROOT / "params.yaml")))  # the default pipeline: no weights stage

pytestmark = pytest.mark.integration


def sh(repo: Path, *args: str, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(args),
        cwd=repo,
        env=env or repo_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout


def repo_env(repo: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(repo),
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PYTHONUNBUFFERED="1",
        WANDB_MODE="offline",
        DVC_NO_ANALYTICS="1",
    )
    return env


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The project in a fresh git + DVC repo, after one full `dvc repro` on the tiny
    profile (importtime on, to see which gptpkg modules each stage loads)."""
    repo = tmp_path_factory.mktemp("project")
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("profiles", "gptpkg", "data/corpus"):  # data/corpus: empty (.gitkeep), the user's text goes there
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, repo / ".dvc" / name)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "test")
    sh(repo, str(BIN / "gptpkg"), "profile", "tiny")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project, tiny profile")
    env = repo_env(repo)
    env["PYTHONPROFILEIMPORTTIME"] = "1"
    t0 = time.perf_counter()
    out = sh(repo, str(BIN / "dvc"), "repro", env=env)
    return repo, out, time.perf_counter() - t0


def test_repro_runs_every_stage_and_writes_outputs(repo):
    path, out, _ = repo
    assert ran(out) == STAGES or sorted(ran(out)) == sorted(STAGES)
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    for stage, entry in lock["stages"].items():
        for out_entry in entry.get("outs", []):
            assert (path / out_entry["path"]).exists(), f"{stage}: {out_entry['path']} missing"
    m = {s: json.loads((path / "metrics" / f"{s}.json").read_text()) for s in STAGES}
    assert m["pretrain"]["val_loss"] < m["pretrain"]["initial_val_loss"]
    assert 0.0 <= m["finetune_spam"]["test_accuracy"] <= 1.0
    assert m["baseline_spam"]["test_accuracy"] > 0.9
    # text (paths, hashes, the judge's state) is the run's record, not a DVC metric
    assert json.loads((path / "metrics" / "runtime" / "finetune_instruct.json").read_text())["judge"] == "skipped"
    assert not [k for s in STAGES if REGISTRY[s].figures for k, v in m[s].items() if isinstance(v, str)]
    for s in ("pretrain", "finetune_spam", "finetune_instruct"):
        runtime = json.loads((path / "metrics" / "runtime" / f"{s}.json").read_text())
        assert runtime["stage_wall_time_s"] > 0 and "wandb_run" in runtime
        assert "wall_time_s" not in m[s]  # run-dependent figures kept out of the metrics
    responses = json.loads((path / "metrics" / "instruct_responses.json").read_text())
    assert len(responses) == 110
    assert set(responses[0]) == {"instruction", "input", "output", "model_response", "item", "rouge_l", "exact_match"}
    scores = json.loads((path / "plots" / "finetune_instruct_scores.json").read_text())
    assert [r["rouge_l"] for r in scores] == [r["rouge_l"] for r in responses]
    assert sum(r["rouge_l"] for r in scores) / 110 == pytest.approx(m["finetune_instruct"]["test_rouge_l"])
    for s in ("finetune_instruct", "baseline_instruct"):
        assert {"val_rouge_l", "val_exact_match", "test_rouge_l", "test_exact_match"} <= set(m[s]), s
        assert 1 / 110 <= m[s]["test_distinct_answers"] <= 1.0, s
    distinct = {" ".join(r["model_response"].split()).casefold() for r in responses}
    assert m["finetune_instruct"]["test_distinct_answers"] == pytest.approx(len(distinct) / 110)
    assert m["baseline_instruct"]["test_rouge_l"] > 0.3
    history = json.loads((path / "plots" / "finetune_spam.json").read_text())
    assert history[-1]["step"] == m["finetune_spam"]["steps"] and "val_accuracy" in history[-1]
    for png in ("pretrain_loss", "finetune_spam_loss", "finetune_spam_confusion", "finetune_instruct_loss"):
        assert (path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "W&B offline run in" in out and "wandb sync" in out


def test_stage_deps_are_the_modules_it_runs(repo):
    """dvc.yaml lists, per stage, every gptpkg module that stage imports when it runs (the
    generated list is the static import graph: it may hold more, e.g. hf_weights.py, loaded
    only with init: openai, never less)."""
    path, out, _ = repo
    dvc = yaml.safe_load((path / "dvc.yaml").read_text())
    chunks = re.split(r"Running stage '([^']+)'", out)[1:]
    seen = {}
    for stage, text in zip(chunks[::2], chunks[1::2]):
        mods = set(re.findall(r"import time:.*\|\s+(gptpkg(?:\.\w+)*)\s*$", text, flags=re.M))
        seen[stage] = {
            m.replace(".", "/") + ("/__init__.py" if (path / m.replace(".", "/")).is_dir() else ".py") for m in mods
        }
    assert sorted(seen) == sorted(STAGES)
    for stage, imported in seen.items():
        declared = {d for d in dvc["stages"][stage]["deps"] if d.startswith("gptpkg/")}
        assert imported <= declared, f"{stage}: undeclared deps {sorted(imported - declared)}"
        assert f"gptpkg/stages/{stage}.py" in imported


def test_second_repro_does_nothing(repo):
    path, _, _ = repo
    t0 = time.perf_counter()
    out = sh(path, str(BIN / "dvc"), "repro")
    assert ran(out) == []
    assert "Data and pipelines are up to date" in out
    assert time.perf_counter() - t0 < 60


def test_finetune_param_change_reruns_only_that_stage_and_its_downstream(repo):
    path, _, _ = repo
    sh(path, str(BIN / "dvc"), "params", "diff")  # smoke
    params = (path / "params.yaml").read_text()
    new = re.sub(r"(finetune_spam:\n(?:  .*\n)*?  max_steps:) 4", r"\1 3", params)
    assert new != params
    (path / "params.yaml").write_text(new)
    status = json.loads(sh(path, str(BIN / "dvc"), "status", "--json"))
    assert sorted(status) == ["finetune_spam"]
    out = sh(path, str(BIN / "dvc"), "repro")
    # the classifier changed, so its export and package follow; nothing upstream or beside
    assert ran(out) == ["finetune_spam", "export_onnx", "package"]
    assert json.loads((path / "metrics" / "finetune_spam.json").read_text())["steps"] == 3
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "finetune_spam.max_steps=3")


def _find(node, pred):
    if pred(node):
        return node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for c in children:
        hit = _find(c, pred)
        if hit is not None:
            return hit
    return None


def _served(path: Path) -> str:
    code = "import bentoml; print(bentoml.models.get('gptpkg-spam-classifier-served:latest').tag)"
    return sh(path, sys.executable, "-c", code).strip().splitlines()[-1]


def test_exp_run_and_exp_show(repo):
    """An experiment reruns the classifier and packages a new version, but what the service
    serves moves only with `gptpkg promote`; `dvc metrics diff` shows figures only."""
    path, _, _ = repo
    packaged = json.loads((path / "models" / "bento_model.json").read_text())["bento_model"]
    sh(path, "git", "add", "-A")  # promote tags the commit whose dvc.lock built the model
    sh(path, "git", "commit", "-qm", "the packaged model", check=False)  # (nothing new after an earlier test)
    out = sh(path, str(BIN / "gptpkg"), "promote")
    assert f"{packaged.replace(':', '-served:')} is now gptpkg-spam-classifier-served:latest" in out
    assert "git: tagged HEAD spam-classifier-onnx#served#1" in out and "aliased 'served'" in out
    served = _served(path)
    out = sh(path, str(BIN / "dvc"), "exp", "run", "-S", "finetune_spam.lr=0.001")
    assert ran(out) == ["finetune_spam", "export_onnx", "package"]
    assert json.loads((path / "models" / "bento_model.json").read_text())["bento_model"] != packaged
    assert _served(path) == served  # the experiment's model is stored, not served
    diff = json.loads(sh(path, str(BIN / "dvc"), "metrics", "diff", "--all", "--json"))
    assert "metrics/finetune_spam.json" in diff and "test_accuracy" in diff["metrics/finetune_spam.json"]
    assert not [f for f in diff if "runtime" in f or "package" in f], sorted(diff)
    shown = json.loads(sh(path, str(BIN / "dvc"), "metrics", "show", "--json"))
    files = _find(shown, lambda n: isinstance(n, dict) and "metrics/finetune_spam.json" in n)
    assert sorted(files) == sorted(f"metrics/{s}.json" for s in REGISTRY if REGISTRY[s].figures), sorted(files)
    shown = json.loads(sh(path, str(BIN / "dvc"), "exp", "show", "--json"))

    def is_exp(node):
        try:
            lr = node["params"]["params.yaml"]["data"]["finetune_spam"]["lr"]
            acc = node["metrics"]["metrics/finetune_spam.json"]["data"]["test_accuracy"]
        except (KeyError, TypeError):
            return False
        return lr == 0.001 and isinstance(acc, float)

    assert _find(shown, is_exp) is not None, json.dumps(shown)[:3000]


def test_metrics_show_and_plots_show(repo):
    path, _, _ = repo
    metrics = json.loads(sh(path, str(BIN / "dvc"), "metrics", "show", "--json"))
    assert _find(metrics, lambda n: isinstance(n, dict) and "test_spam_f1" in n) is not None
    out = sh(path, str(BIN / "dvc"), "plots", "show")
    html = (path / "dvc_plots" / "index.html").read_text()
    assert "dvc_plots/index.html" in out
    for plot in (
        "pretrain_loss",
        "finetune_spam_accuracy",
        "finetune_spam_confusion",
        "finetune_instruct_loss",
        "instruct_rouge_l",
    ):
        assert plot in html
    assert "finetune_spam_confusion.png" in html  # the PNGs are stage plots too


def _wandb_records(run_file: Path):
    """The protobuf records of an offline `.wandb` file, read straight from its format (a
    7-byte `:W&B` header, then a LevelDB log: 32 KiB blocks of records, each with a
    crc32/length/type header; FIRST/MIDDLE/LAST pieces join into one record). wandb's own
    reader is private and moved out of Python in 0.31, so the test does not lean on it."""
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} does not start with the W&B header"
    block, pos, pieces = 32768, 7, []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block trailer too short for a header is zero padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero fill after the last record
            pos += room
            continue
        assert kind in (1, 2, 3, 4), f"{run_file}: unknown record type {kind} at byte {pos}"
        payload = data[pos + 7 : pos + 7 + length]
        assert len(payload) == length, f"{run_file}: record at byte {pos} is truncated"
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, (
            f"{run_file}: bad checksum at byte {pos}"
        )
        pos += 7 + length
        pieces.append(payload)
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE.../LAST chain
            rec = pb.Record()
            rec.ParseFromString(b"".join(pieces))
            pieces = []
            yield rec


def test_wandb_offline_runs_hold_history_config_and_checkpoint(repo):
    path, _, _ = repo
    runs = {}
    for f in (path / "wandb_runs" / "wandb").glob("offline-run-*/run-*.wandb"):
        recs = list(_wandb_records(f))
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        runs.setdefault(run.job_type, []).append((run, recs))
    assert {"pretrain", "finetune_spam", "finetune_instruct"} <= set(runs)
    run, recs = runs["pretrain"][0]
    config = {c.key: json.loads(c.value_json) for c in run.config.update}
    assert config["pretrain"]["model"] == "tiny"
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]
    evals = [h for h in history if "val_loss" in h]
    assert len(evals) >= 2 and all("train_loss" in h and "val_perplexity" in h for h in evals)
    assert any("step_loss" in h for h in history)  # every optimizer step between evals
    artifacts = {(r.artifact.name, r.artifact.type) for r in recs if r.WhichOneof("record_type") == "artifact"}
    assert ("pretrain-checkpoint", "model") in artifacts
    assert any(t == "run_table" for _, t in artifacts)  # the samples table
    # export_onnx logs the ONNX model, aliased with the BentoML tag version package gives it
    versions = set()
    for _, recs in runs["export_onnx"]:
        (onnx,) = [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact"]
        assert (onnx.name, onnx.type) == ("spam-classifier-onnx", "model")
        meta = json.loads(onnx.metadata)
        assert set(onnx.aliases) == {"latest", f"fp32-{meta['fp32_sha256'][:12]}"} and "fp32_test_accuracy" in meta
        versions.add(f"fp32-{meta['fp32_sha256'][:12]}")
    package = json.loads((path / "metrics" / "package.json").read_text())
    assert package["bento_model"].split(":")[1] in versions


def test_model_registry_artifacts(repo):
    """dvc.yaml `artifacts:` names the classifier and the ONNX model; a version tag (as
    `gto register` writes it) makes them resolvable through dvc.api."""
    path, _, _ = repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    for name, key in (("spam-classifier", "spam_classifier"), ("spam-classifier-onnx", "onnx")):
        sh(path, "git", "tag", "-a", f"{name}@v0.0.1", "-m", f"register {name}")
        # In its own process, as a user's script would call it (DVC's in-process state
        # and daemons stay out of the test process).
        code = f"import json, dvc.api; print(json.dumps(dvc.api.artifacts_show({name!r}, repo='.')))"
        shown = json.loads(sh(path, sys.executable, "-c", code).strip().splitlines()[-1])
        assert shown["path"] == params["paths"][key] and (path / shown["path"]).is_dir()
    # the promoted ONNX model (test_exp_run_and_exp_show): GTO's stage tag `gptpkg promote` wrote
    code = "import json, dvc.api; print(json.dumps(dvc.api.artifacts_show('spam-classifier-onnx', stage='served', repo='.')))"
    shown = json.loads(sh(path, sys.executable, "-c", code).strip().splitlines()[-1])
    assert shown["rev"] == sh(path, "git", "rev-list", "-n1", "spam-classifier-onnx#served#1").strip()
    record = json.loads((path / params["paths"]["bento_model"]).read_text())
    assert record["bento_model"] == json.loads((path / "metrics" / "package.json").read_text())["bento_model"]


def test_forced_rerun_gives_identical_metrics_and_weights(repo):
    path, _, _ = repo

    def snapshot():
        return (
            (path / "metrics" / "pretrain.json").read_text(),
            hashlib.sha256((path / "models" / "pretrained" / "model.safetensors").read_bytes()).hexdigest(),
            (path / "metrics" / "pretrain_samples.json").read_text(),
        )

    before = snapshot()
    out = sh(path, str(BIN / "dvc"), "repro", "--force", "--single-item", "pretrain")
    assert ran(out) == ["pretrain"]
    assert snapshot() == before

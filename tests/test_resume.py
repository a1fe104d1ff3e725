"""`--resume` with DVC: an interrupted stage leaves its last periodic checkpoint in the
workspace; `gptpkg <stage> --resume` finishes it with the same result as an uninterrupted
run, and refuses a checkpoint written with other training params."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import prepared_tiny_workspace

from gptpkg.cli import main
from gptpkg.config import load_params
from gptpkg.loggers import NullLogger

ROOT = Path(__file__).resolve().parents[1]

SETS = ["pretrain.max_steps=6", "pretrain.eval_every=3", "pretrain.checkpoint_every=2"]


class Interrupt(Exception):
    pass


class StopAtFirstEval(NullLogger):
    def log(self, metrics, step):
        if "val_loss" in metrics:
            raise Interrupt(f"interrupted at step {step}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_tiny_workspace(tmp_path_factory.mktemp("resume"))


def test_resume_finishes_an_interrupted_stage_identically(prepared, monkeypatch, capsys):
    import gptpkg.runner as runner

    monkeypatch.chdir(prepared)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["pretrain", "--no-progress", "--set", SETS[0], "--set", SETS[1], "--set", SETS[2]]) == 0
    uninterrupted = json.loads(Path("metrics/pretrain.json").read_text())
    weights = Path("models/pretrained/model.safetensors").read_bytes()

    with monkeypatch.context() as m:
        m.setattr(runner, "open_logger", lambda params, stage: (StopAtFirstEval(), None))
        with pytest.raises(Interrupt):
            runner.run_stage("pretrain", load_params("params.yaml", SETS))
    cfg = json.loads(Path("models/pretrained/config.json").read_text())
    assert cfg["meta"]["step"] == 2  # the periodic checkpoint the interruption left

    assert main(["pretrain", "--no-progress", "--resume", "--set", SETS[0], "--set", SETS[1], "--set", SETS[2]]) == 0
    assert json.loads(Path("metrics/pretrain.json").read_text()) == uninterrupted
    assert Path("models/pretrained/model.safetensors").read_bytes() == weights


def test_resume_refuses_other_training_params(prepared, monkeypatch, capsys):
    monkeypatch.chdir(prepared)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["pretrain", "--no-progress", "--set", SETS[0]]) == 0
    before = Path("models/pretrained/model.safetensors").read_bytes()
    assert (
        main(["pretrain", "--no-progress", "--resume", "--set", "pretrain.max_steps=8", "--set", "pretrain.lr=0.0123"])
        == 1
    )
    err = capsys.readouterr().err
    assert "--resume" in err and "['lr', 'max_steps']" in err and "run without --resume" in err
    assert Path("models/pretrained/model.safetensors").read_bytes() == before


def test_resume_compares_the_stage_keys_that_shape_training_too(prepared, monkeypatch, capsys):
    """drop_rate is a pretrain key outside TrainConfig: a checkpoint trained with 0.0 does
    not resume under 0.3. The sample prompt acts only beside training, so it may differ."""
    monkeypatch.chdir(prepared)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["pretrain", "--no-progress", "--set", SETS[0], "--set", "pretrain.drop_rate=0.0"]) == 0
    config_file = Path("models/pretrained/config.json")
    recorded = json.loads(config_file.read_text())["meta"]["params"]
    assert recorded["drop_rate"] == 0.0 and recorded["max_steps"] == 6
    assert "sample_prompt" not in recorded and "sample_tokens" not in recorded
    before = Path("models/pretrained/model.safetensors").read_bytes()
    assert main(["pretrain", "--no-progress", "--resume", "--set", SETS[0], "--set", "pretrain.drop_rate=0.3"]) == 1
    err = capsys.readouterr().err
    assert "other values for ['drop_rate'] (checkpoint: [0.0], params: [0.3])" in err
    assert Path("models/pretrained/model.safetensors").read_bytes() == before
    assert (
        main(
            [
                "pretrain",
                "--no-progress",
                "--resume",
                "--set",
                SETS[0],
                "--set",
                "pretrain.drop_rate=0.0",
                "--set",
                "pretrain.sample_prompt=Hello",
            ]
        )
        == 0
    )
    assert Path("models/pretrained/model.safetensors").read_bytes() == before  # a finished run: nothing to train


KILL_SETS = ["pretrain.corpus=[sms]", "pretrain.max_steps=30", "pretrain.eval_every=0", "pretrain.checkpoint_every=3"]


def _pretrain(root: Path, *extra: str) -> subprocess.Popen:
    sets = [a for s in KILL_SETS for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "gptpkg.cli", "pretrain", "--no-progress", *sets, *extra],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def test_kill_9_then_resume_is_byte_identical_across_shard_boundaries(tmp_path):
    """Shards of 1,100 tokens: every few windows of 32 tokens straddle two shards. A
    pretrain killed with SIGKILL after a periodic checkpoint resumes from the loader's
    saved position and ends with the weights of an uninterrupted run."""
    import torch

    root = prepared_tiny_workspace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prep = [sys.executable, "-m", "gptpkg.cli", "prepare", "--set", "prepare.shard_tokens=1100"]
    subprocess.run(prep, cwd=root, env=env, check=True, capture_output=True)
    manifest = json.loads((root / "data/processed/corpus/manifest.json").read_text())
    assert len(manifest["sources"]["sms"]["train"]["shards"]) > 50

    assert _pretrain(root).wait(timeout=600) == 0
    weights = (root / "models/pretrained/model.safetensors").read_bytes()
    shutil.rmtree(root / "models/pretrained")

    proc = _pretrain(root)
    config = root / "models/pretrained/config.json"
    while proc.poll() is None and not (config.is_file() and json.loads(config.read_text())["meta"]["step"] >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads(config.read_text())["meta"]["step"]
    assert 3 <= step < 30, f"the run was killed at step {step}: not mid-run"
    state = torch.load(root / "models/pretrained/trainer.pt", weights_only=True)
    windows = (manifest["sources"]["sms"]["train"]["tokens"] - 1) // 32
    assert state["loader"] == {"micro_batches": step, "examples": windows}

    resumed = _pretrain(root, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    assert (root / "models/pretrained/model.safetensors").read_bytes() == weights

    # the data re-prepared with another split: the loader's position means nothing there
    subprocess.run([*prep, "--set", "prepare.pretrain_train_ratio=0.8"], cwd=root, env=env, check=True)
    again = _pretrain(root, "--resume")
    assert again.wait(timeout=600) == 1
    assert "the training data changed" in again.stderr.read().decode()

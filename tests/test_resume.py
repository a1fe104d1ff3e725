"""`--resume` with DVC: an interrupted stage leaves its last periodic checkpoint in the
workspace; `gptpkg <stage> --resume` finishes it with the same result as an uninterrupted
run, and refuses a checkpoint written with other training params."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import prepared_tiny_workspace

from gptpkg.cli import main
from gptpkg.config import load_params
from gptpkg.loggers import NullLogger

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

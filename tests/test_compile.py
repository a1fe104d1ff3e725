"""torch.compile in the fine-tunings: one graph however many lengths the buckets have."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from helpers import prepared_tiny_workspace

from gptpkg.data import IGNORE_INDEX, PAD_ID, classification_collate, instruction_collate
from gptpkg.finetune import padded_to_multiple


def test_a_compiled_soup_compiles_one_graph(tmp_path):
    """A soup of two compiled fine-tunings over bucketed batches of many lengths and two
    batch sizes compiles the model's forward once, and no member recompiles it. Dynamo's
    own log (TORCH_LOGS) names every graph it compiles and every recompilation."""
    root = prepared_tiny_workspace(tmp_path)
    env = {**os.environ, "TORCH_LOGS": "recompiles,dynamo", "WANDB_MODE": "disabled"}
    sets = ["compile=true", "soup=2", "max_steps=10", "eval_every=0", "init=scratch", "model=tiny"]
    cmd = [sys.executable, "-m", "gptpkg.cli", "finetune_spam", "--no-progress"]
    for s in sets:
        cmd += ["--set", f"finetune_spam.{s}"]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    graphs = set(re.findall(r"\[(\d+/\d+)[^\]]*\] Step 1: torchdynamo done tracing", log))
    assert graphs == {"0/0"}, (graphs, log[-3000:])
    assert "Recompiling function" not in log, log[-3000:]


def test_padding_to_a_multiple_changes_no_logit_or_loss(tok):
    """The compiled fine-tunings' padding: lengths rounded up to 8 (at most max_length);
    padded with the end token and ignored targets, so no result moves beyond float noise."""
    from gptpkg.model import GPT, GPTClassifier
    from gptpkg.presets import model_config

    items = [{"input_ids": tok.encode(t), "label": i % 2} for i, t in enumerate(["Win a prize now", "hi", "ok then"])]
    plain = classification_collate(items)
    padded = padded_to_multiple(classification_collate, 8, 32, items)
    assert plain["input_ids"].shape[1] == 4 and padded["input_ids"].shape[1] == 8
    assert (padded["input_ids"][:, 4:] == PAD_ID).all() and torch.equal(padded["lengths"], plain["lengths"])
    assert padded_to_multiple(classification_collate, 8, 6, items)["input_ids"].shape[1] == 6  # capped
    torch.manual_seed(0)
    model = GPTClassifier(GPT(model_config("tiny")), 2).eval()
    with torch.no_grad():
        a = model(plain["input_ids"], plain["lengths"])
        b = model(padded["input_ids"], padded["lengths"])
    torch.testing.assert_close(a, b)

    rows = [{"input_ids": tok.encode("Say hi. hi"), "prompt_len": 3}, {"input_ids": tok.encode("x"), "prompt_len": 1}]
    plain = instruction_collate(rows)
    padded = padded_to_multiple(instruction_collate, 8, 64, rows)
    assert padded["targets"].shape[1] == 8 and (padded["targets"][:, plain["targets"].shape[1] :] == IGNORE_INDEX).all()
    lm = GPT(model_config("tiny")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            lm(plain["input_ids"], targets=plain["targets"]), lm(padded["input_ids"], targets=padded["targets"])
        )

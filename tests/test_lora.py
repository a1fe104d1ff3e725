"""LoRA (gptpkg.lora) for both fine-tunings: adapters start as the identity, merge exactly,
count as the formula says; the real stages save only the adapter with its base named and
hashed, a soup of adapters is the mean of their updates, the ONNX export merges them and
keeps parity, and `gptpkg generate` runs an adapted instruction model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import prepared_tiny_workspace

from gptpkg.lora import LoRALinear, adapter_of, apply_lora, average_adapters, merge_lora
from gptpkg.model import GPT, GPTClassifier
from gptpkg.presets import model_config

BASE = {"init": "pretrained", "path": "-", "sha256": "-"}


def test_adapters_start_as_the_base_and_merge_exactly():
    torch.manual_seed(0)
    base = GPTClassifier(GPT(model_config("tiny")), 2).eval()
    model = copy.deepcopy(base)
    apply_lora(model, 4, 8.0, 0.0, ["attn.qkv", "mlp.fc"], BASE)
    idx, lengths = torch.randint(0, 50257, (3, 10)), torch.tensor([10, 4, 1])
    torch.testing.assert_close(model(idx, lengths), base(idx, lengths))  # B = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.1)
    adapted = model(idx, lengths)
    assert not torch.allclose(adapted, base(idx, lengths))
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert adapter_of(merged) is None and not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx, lengths), adapted, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_are_the_adapters_and_the_head():
    with torch.device("meta"):
        clf = GPTClassifier(GPT(model_config("gpt2-small")), 2)
        apply_lora(clf, 16, 16.0, 0.0, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], BASE)
    C = 768
    per_block = 16 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert clf.num_params(trainable_only=True) == 12 * per_block + (2 * C + 2) == 2_360_834
    trainable = {n.rsplit(".", 1)[-1] for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b", "weight", "bias"}  # weight/bias: the head's only
    assert all(p.requires_grad == (n.startswith("head.") or "lora_" in n) for n, p in clf.named_parameters())


def test_a_soup_of_adapters_is_the_mean_of_their_updates():
    torch.manual_seed(1)
    start = GPTClassifier(GPT(model_config("tiny")), 2).eval()
    apply_lora(start, 2, 4.0, 0.0, ["attn.proj"], BASE)
    members = [copy.deepcopy(start) for _ in range(3)]
    for m in members:
        for p in m.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
    merged = [copy.deepcopy(m) for m in members]
    for m in merged:
        merge_lora(m)
    want = {k: torch.stack([m.state_dict()[k] for m in merged]).mean(0) for k in merged[0].state_dict()}
    soup = copy.deepcopy(members[0])
    average_adapters(soup, members)
    assert soup.backbone.blocks[0].attn.proj.lora_a.shape == (6, 32)  # rank 3 x 2, emb_dim 32
    merge_lora(soup)
    torch.testing.assert_close(soup.state_dict(), want, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def lora_workspace(tmp_path_factory):
    """The tiny pipeline with trainable: lora for both fine-tunings (the classifier a
    2-member soup), pretrain, finetune_spam, export_onnx and finetune_instruct run."""
    from gptpkg.config import load_params
    from gptpkg.runner import run_stage

    root = prepared_tiny_workspace(tmp_path_factory.mktemp("lora"))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        params = load_params(
            "params.yaml",
            [
                "wandb.mode=disabled",
                "finetune_spam.trainable=lora",
                "finetune_spam.lora_rank=4",
                "finetune_spam.soup=2",
                "finetune_spam.lr=0.01",
                "finetune_instruct.trainable=lora",
                "finetune_instruct.lora_targets=[attn.qkv]",
            ],
        )
        metrics = {s: run_stage(s, params) for s in ("pretrain", "finetune_spam", "export_onnx", "finetune_instruct")}
    finally:
        os.chdir(cwd)
    return root, params, metrics


def test_the_checkpoint_is_the_adapter_naming_its_base(lora_workspace):
    from safetensors import safe_open

    from gptpkg.checkpoint import load_checkpoint
    from gptpkg.raw import sha256_of

    root, params, metrics = lora_workspace
    ckpt = root / params.paths.spam_classifier
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        ranks = {f.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_a")}
    assert keys and all("lora_" in k or k.startswith("head.") for k in keys)
    assert ranks == {8}  # the 2-member soup of rank-4 adapters
    config = json.loads((ckpt / "config.json").read_text())
    base = root / params.paths.pretrained
    assert config["adapter"]["base"] == {
        "init": "pretrained",
        "path": params.paths.pretrained,
        "sha256": sha256_of(base / "model.safetensors"),
    }
    spam = metrics["finetune_spam"]
    assert 0 < spam["n_trainable_params"] < 0.2 * GPT(model_config("tiny")).num_params()
    # the export merged the adapter: parity with the adapted model, the graph a plain classifier
    onnx = metrics["export_onnx"]
    assert onnx["parity_label_mismatches"] == 0 and onnx["parity_max_abs_logit_diff"] <= onnx["parity_atol"]
    assert onnx["torch_test_accuracy"] == spam["test_accuracy"]

    cwd = Path.cwd()
    os.chdir(root)
    try:
        model, _ = load_checkpoint(params.paths.spam_classifier)
        assert adapter_of(model)["rank"] == 4
        # a changed base is an error naming it, never a silently different model
        (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes() + b" ")
        from gptpkg.checkpoint import CheckpointError

        with pytest.raises(CheckpointError, match=r"the adapter's base .*model.safetensors has sha256 .* expected"):
            load_checkpoint(params.paths.spam_classifier)
        (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-1])
    finally:
        os.chdir(cwd)


def test_adapted_instruction_model_generates(lora_workspace):
    import subprocess
    import sys

    root, params, metrics = lora_workspace
    instruct = metrics["finetune_instruct"]
    assert instruct["n_trainable_params"] == 2 * 8 * (32 + 3 * 32)  # rank 8 on attn.qkv of 2 blocks (C = 32)
    with open(root / params.paths.instruct_model / "config.json") as f:
        assert json.load(f)["adapter"]["targets"] == ["attn.qkv"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", "generate", params.paths.instruct_model, "Hello", "--max-new-tokens", "3"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    from gptpkg.checkpoint import load_checkpoint
    from gptpkg.generate import generate_text
    from gptpkg.tokenizer import get_tokenizer

    cwd = Path.cwd()
    os.chdir(root)
    try:
        model, _ = load_checkpoint(params.paths.instruct_model)
        base, _ = load_checkpoint(params.paths.pretrained)
    finally:
        os.chdir(cwd)
    assert out.stdout.strip() == generate_text(model, get_tokenizer(), "Hello", 3).strip() != ""
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():  # the adapter trained: the model is no longer its base
        assert not torch.allclose(model.eval()(idx), base.eval()(idx))

"""The MFU formula against a hand count, and the peak tables."""

from __future__ import annotations

import pytest
import torch

from gptpkg.model import GPT
from gptpkg.perf import GPU_BF16_PEAK, flops_per_token, matmul_params, measure_matmul_flops, mfu
from gptpkg.presets import model_config


def test_flops_per_token_matches_a_hand_count_on_the_tiny_preset():
    cfg = model_config("tiny")  # d=32, L=2, V=50257
    d, L, V, T = 32, 2, 50257, 128
    per_block = d * 3 * d + d * d + d * 4 * d + 4 * d * d  # qkv, attn proj, fc, mlp proj
    assert per_block == 12_288
    n = L * per_block + d * V  # + the LM head; embedding lookups are not matmuls
    assert matmul_params(cfg) == n == 1_632_800
    assert flops_per_token(cfg, T) == 6 * n + 12 * L * d * T == 9_895_104
    assert mfu(cfg, T, tokens_per_s=1000.0, peak_flops=1e10) == pytest.approx(9_895_104 * 1000 / 1e10)


def test_matmul_params_are_the_weights_of_the_models_linear_layers():
    for preset in ("tiny", "cpu-mini"):
        with torch.device("meta"):
            model = GPT(model_config(preset))
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert matmul_params(model.cfg) == linear  # the tied head counted once, as a matmul


def test_gpu_peak_table_and_cpu_peak_measurement():
    table = dict(GPU_BF16_PEAK)
    assert table["H100"] == 989e12 and table["A100"] == 312e12
    names = [n for n, _ in GPU_BF16_PEAK]
    # a more specific name precedes any shorter one it contains (first match wins)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert a.lower() not in b.lower(), (a, b)
    assert measure_matmul_flops(256, reps=3) > 1e8


_RSS_AFTER_FREE = """
import sys
from gptpkg.perf import keep_freed_memory
applied = keep_freed_memory()
def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
before = rss_mib()
block = b"x" * (200 * 2**20)  # 200 MiB, every page written
peak = rss_mib() - before
del block
print(applied, peak, rss_mib() - before)
"""


@pytest.mark.parametrize("env, kept", [({}, True), ({"GPTPKG_KEEP_FREED_MEMORY": "0"}, False)])
def test_keep_freed_memory_keeps_a_freed_block_resident(env, kept):
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _RSS_AFTER_FREE], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout.split()
    applied, peak, grown = out[0] == "True", float(out[1]), float(out[2])
    assert applied is kept and peak > 150
    # glibc unmaps a freed 200 MiB block at once by default; kept, it stays for reuse
    assert (grown > 150) if kept else (grown < 50)


def test_training_mfu_uses_the_last_window_and_the_gpus_published_peak():
    """What the pretrain stage reports on CUDA (runtime metrics): MFU of the last eval
    window (past the compile) and of the whole run, against the named GPU's peak."""
    from gptpkg.perf import published_peak, training_mfu
    from gptpkg.runner import RUNTIME_KEYS

    cfg = model_config("gpt2-small")
    history = [{"step": 200, "tokens_per_s": 300_000.0}, {"step": 300}, {"step": 400, "tokens_per_s": 500_000.0}]
    got = training_mfu(cfg, 1024, history, 400_000.0, "NVIDIA H200")
    assert got["peak_flops"] == published_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert got["mfu"] == pytest.approx(flops_per_token(cfg, 1024) * 500_000 / 989e12)
    assert got["mfu_overall"] == pytest.approx(flops_per_token(cfg, 1024) * 400_000 / 989e12)
    assert 0.4 < got["mfu"] < 0.5 and got["gpu"] == "NVIDIA H200"
    assert published_peak("NVIDIA H100 PCIe") == 756e12  # the more specific name first
    assert training_mfu(cfg, 1024, history, 1.0, "Some Future GPU") == {}
    assert set(got) <= set(RUNTIME_KEYS)  # run-dependent: metrics/runtime, not metrics/

"""Model FLOPs and utilisation (MFU), and the peak rates they are measured against.

MFU = flops_per_token * tokens_per_s / peak, with flops_per_token = 6 N + 12 L d T
(PaLM appendix B): N counts the weights that take part in matrix multiplies (every
block's qkv, proj, fc, proj and the LM head; not embedding lookups, biases or norms),
6 N is a forward and backward through them, 12 L d T the attention scores and the
weighted sum (QK^T and AV, forward and backward) at sequence length T.
"""

from __future__ import annotations

import time

import torch

from .presets import ModelConfig

# Published dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by device-name fragment.
# Matched in order, so the more specific names come first.
GPU_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


def matmul_params(cfg: ModelConfig, n_out: int | None = None) -> int:
    """Weights used in matmuls per token: 12 d^2 per block plus the head (d x V, or
    d x n_out for a classifier head)."""
    d = cfg.emb_dim
    head = d * (cfg.vocab_size if n_out is None else n_out)
    return cfg.n_layers * 12 * d * d + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 N + 12 L d T."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.emb_dim * seq_len


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token(cfg, seq_len) * tokens_per_s / peak_flops


def published_peak(name: str) -> float | None:
    """The published dense bf16 peak of the GPU called `name`; None when not in the table."""
    for fragment, peak in GPU_BF16_PEAK:
        if fragment.lower() in name.lower():
            return peak
    return None


def gpu_peak_flops(device: torch.device | int = 0) -> tuple[str, float | None]:
    """(device name, its published dense bf16 peak or None when not in the table)."""
    name = torch.cuda.get_device_name(device)
    return name, published_peak(name)


def training_mfu(
    cfg: ModelConfig, seq_len: int, history: list[dict], tokens_per_s: float, device_name: str
) -> dict[str, float | str]:
    """A training run's MFU against its GPU's published dense bf16 peak: `mfu` from the
    last eval window's tokens/s (past the compile and warm-up), `mfu_overall` from the
    whole run's; with the peak and the GPU. Empty when the GPU's peak is unknown."""
    peak = published_peak(device_name)
    if peak is None:
        return {}
    steady = next((r["tokens_per_s"] for r in reversed(history) if "tokens_per_s" in r), tokens_per_s)
    return {
        "mfu": mfu(cfg, seq_len, steady, peak),
        "mfu_overall": mfu(cfg, seq_len, tokens_per_s, peak),
        "peak_flops": peak,
        "gpu": device_name,
    }


def measure_matmul_flops(
    n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32, clock=time.perf_counter
) -> float:
    """The fp32 (or `dtype`) matmul rate of this CPU now: median over `reps` timed
    (n x n) @ (n x n) products, FLOP/s. `clock=time.process_time` gives FLOPs per
    CPU-second of this process instead (the rate while it is scheduled, which a busy
    shared machine does not change much)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up (threads, allocator)
    times = []
    for _ in range(reps):
        t = clock()
        a @ b
        times.append(clock() - t)
    times.sort()
    return 2 * n**3 / max(times[len(times) // 2], 1e-9)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees the same large buffers every step (logits
    slabs, (V, C) gradients, activations). By default glibc serves each block over
    128 KiB-32 MiB with a fresh mmap and unmaps it on free, so every step page-faults
    hundreds of MB back in; that costs a few points of MFU on a small model
    (bench/train_throughput.py). This disables mmap-served blocks and heap trimming for
    the process: peak RSS stays as it was, it is just not handed back between steps.
    The same effect as `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`
    (or jemalloc / tcmalloc, which PyTorch's CPU tuning guide recommends). Process-wide,
    so only the training entry points call it; `GPTPKG_KEEP_FREED_MEMORY=0` turns it off.
    Returns whether it was applied (False off glibc, or when turned off).
    """
    import ctypes
    import os
    import sys

    if os.environ.get("GPTPKG_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    # mallopt returns 1 on success
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))

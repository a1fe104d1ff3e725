"""Training throughput and MFU: the fast path against the textbook path, side by side.

    PYTHONPATH=. python bench/train_throughput.py --preset cpu-small --seq-len 256 --batch-size 8

In one run, on the same preset, batch and sequence length, with the same weights:
- training tokens/s of `GPT` (SDPA attention, fused LayerNorm/GELU kernels, fused and
  chunked head + loss, fused AdamW) and of `ReferenceGPT` (explicit masked attention,
  hand-written LayerNorm/GELU, full logits then cross-entropy, for-loop AdamW),
  repetitions interleaved (fast, plain, peak, fast, plain, peak, ...), medians and the
  ratio; every step is forward, backward, gradient clipping and an optimizer step;
- MFU of each: (6 N + 12 L d T) tokens/s over the peak. On CPU the peak is the fp32
  matmul rate measured between the repetitions of this run; on a GPU the device's
  published dense bf16 peak (`gptpkg.perf.GPU_BF16_PEAK`);
- peak RSS of a real `fit` run at an effective batch of `--accum-batch` examples, once
  as one micro-batch and once as micro-batches of `--batch-size` with gradient
  accumulation (each in its own process, so the figures do not mix);
- generation tokens/s for `--gen-tokens` new tokens: no cache, the dynamic KV cache, the
  static cache and the static cache with a compiled decode step (`--parts generation`).
Pass `--json FILE` to keep the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpkg.config import TrainConfig  # noqa: E402
from gptpkg.loggers import NullLogger  # noqa: E402
from gptpkg.model import GPT  # noqa: E402
from gptpkg.optim import make_optimizer, param_groups  # noqa: E402
from gptpkg.perf import (  # noqa: E402
    flops_per_token,
    gpu_peak_flops,
    keep_freed_memory,
    matmul_params,
    measure_matmul_flops,
)
from gptpkg.presets import model_config  # noqa: E402
from gptpkg.reference import reference_copy  # noqa: E402
from gptpkg.train import autocast, autocast_dtype, should_compile  # noqa: E402

# What `fit` takes as `ctx`: no logging, no resume, no progress bar.
QUIET = SimpleNamespace(logger=NullLogger(), resume=False, progress=False)


def train_step(model, opt, x, y, device, dtype) -> None:
    with autocast(device, dtype):
        loss = model(x, targets=y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def throughput(args, device: torch.device) -> dict:
    cfg = model_config(
        args.preset, drop_rate=0.0, context_length=max(args.seq_len, 1), vocab_multiple=args.vocab_multiple
    )
    torch.manual_seed(0)
    fast = GPT(cfg).to(device)
    plain = reference_copy(fast)
    # Dense AdamW over every parameter (the tied head fills every embedding row anyway).
    tcfg = TrainConfig(device=str(device), precision=args.precision, compile=args.compile, sparse_embedding=False)
    dtype = autocast_dtype(tcfg.precision, device)
    compiled = should_compile(tcfg.compile, device)
    fast_run = torch.compile(fast) if compiled else fast
    fast_opt, _ = make_optimizer(fast, tcfg, device, compiled=compiled)  # as `fit` makes it
    opts = {
        "fast": fast_opt,
        "plain": torch.optim.AdamW(
            param_groups(plain, tcfg.weight_decay),
            lr=tcfg.lr,
            betas=(tcfg.beta1, tcfg.beta2),
            foreach=False,
            fused=False,
        ),
    }
    models = {"fast": fast_run, "plain": plain}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)

    n_tok = args.batch_size * args.seq_len * args.steps

    def timed(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            train_step(models[name], opts[name], x, y, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu_rates[name].append(n_tok / (time.process_time() - c))
        return n_tok / (time.perf_counter() - t)

    for name in models:  # warm-up (allocator, compile)
        train_step(models[name], opts[name], x, y, device, dtype)
    rates: dict[str, list[float]] = {"fast": [], "plain": [], "peak": []}
    # The same per CPU-second of this process (all its threads): on a machine shared
    # with other jobs, wall-clock rates measure the share the scheduler gave us.
    cpu_rates: dict[str, list[float]] = {"fast": [], "plain": [], "peak": []}
    for rep in range(args.reps):
        for name in ("fast", "plain"):
            rates[name].append(timed(name))
        if device.type == "cpu":
            rates["peak"].append(measure_matmul_flops(args.mm_size, reps=3))
            cpu_rates["peak"].append(measure_matmul_flops(args.mm_size, reps=3, clock=time.process_time))
        print(
            f"rep {rep + 1}/{args.reps}: fast {rates['fast'][-1]:.0f} tok/s, plain "
            f"{rates['plain'][-1]:.0f} tok/s"
            + (f", matmul {rates['peak'][-1] / 1e9:.1f} GFLOP/s" if rates["peak"] else ""),
            flush=True,
        )
    if device.type == "cpu":
        peak, peak_src = statistics.median(rates["peak"]), f"measured fp32 matmul ({args.mm_size}^3), median"
    else:
        name, peak = gpu_peak_flops(device)
        peak_src = f"published dense bf16 peak of {name}"
        if peak is None:
            peak, peak_src = float("nan"), f"{name}: not in gptpkg.perf.GPU_BF16_PEAK"
    fpt = flops_per_token(cfg, args.seq_len)
    out = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "matmul_params": matmul_params(cfg),
        "flops_per_token": fpt,
        "peak_flops": peak,
        "peak_source": peak_src,
        "peak_flops_all": rates["peak"],
    }
    for name in ("fast", "plain"):
        med = statistics.median(rates[name])
        out[name] = {"tokens_per_s_median": med, "tokens_per_s_all": rates[name], "mfu": fpt * med / peak}
        if device.type == "cpu":
            cmed, cpeak = statistics.median(cpu_rates[name]), statistics.median(cpu_rates["peak"])
            out[name].update(
                tokens_per_cpu_s_median=cmed, tokens_per_cpu_s_all=cpu_rates[name], mfu_cpu_time=fpt * cmed / cpeak
            )
    if device.type == "cpu":
        out["peak_flops_per_cpu_s"] = statistics.median(cpu_rates["peak"])
        out["peak_flops_per_cpu_s_all"] = cpu_rates["peak"]
    ratios = [f / p for f, p in zip(rates["fast"], rates["plain"])]
    out["fast_over_plain_median"] = statistics.median(ratios)
    out["fast_over_plain_min"] = min(ratios)
    if device.type == "cpu":
        cpu_ratios = [f / p for f, p in zip(cpu_rates["fast"], cpu_rates["plain"])]
        out["fast_over_plain_cpu_time_median"] = statistics.median(cpu_ratios)
        out["fast_over_plain_cpu_time_min"] = min(cpu_ratios)
    return out


def rss_child(args_json: str) -> None:
    """One `fit` run in this process; print its peak RSS (MiB) as JSON. VmHWM, not
    ru_maxrss: Linux carries the parent's RSS at fork into ru_maxrss across exec."""
    from gptpkg.data import TokenWindows
    from gptpkg.train import Task, fit, plan_run

    a = json.loads(args_json)
    torch.set_num_threads(a["threads"])
    cfg = model_config(a["preset"], drop_rate=0.0, context_length=a["seq_len"])
    torch.manual_seed(0)
    model = GPT(cfg)
    n = a["micro"] * a["accum"] * 2 + 1
    data = TokenWindows(torch.randint(0, cfg.vocab_size, (n * a["seq_len"] + 1,)), a["seq_len"], a["seq_len"])
    stack = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    tcfg = TrainConfig(
        batch_size=a["micro"],
        grad_accum_steps=a["accum"],
        max_steps=2,
        epochs=1.0,
        eval_every=0,
        device="cpu",
        compile=False,
    )
    t = time.perf_counter()
    result = fit(model, plan_run(tcfg, model, data, stack), Task(data), QUIET)
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": hwm_kib / 1024, "tokens_per_s": result.tokens_seen / (time.perf_counter() - t)}))


def memory(args) -> dict:
    out = {}
    for micro, accum in ((args.accum_batch, 1), (args.batch_size, args.accum_batch // args.batch_size)):
        spec = json.dumps(
            {
                "preset": args.preset,
                "seq_len": args.seq_len,
                "micro": micro,
                "accum": accum,
                "threads": torch.get_num_threads(),
            }
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", spec],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        if proc.returncode:
            raise RuntimeError(f"fit run (micro-batch {micro} x {accum}) failed:\n{proc.stderr[-2000:]}")
        out[f"micro{micro}_x_accum{accum}"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"effective batch {micro * accum} as {micro} x {accum}: {out[f'micro{micro}_x_accum{accum}']}", flush=True
        )
    return out


def generation(args, device: torch.device) -> dict:
    """Greedy generation tokens/s: no cache, the growing (dynamic) KV cache, the static
    cache, and the static cache with a compiled decode step (CUDA graphs on CUDA), in
    interleaved repetitions after one untimed warm-up each (the compile); medians."""
    from gptpkg.generate import generate

    cfg = model_config(args.preset, drop_rate=0.0)
    if args.gen_prompt + args.gen_tokens > cfg.context_length:
        raise SystemExit(f"--gen-prompt + --gen-tokens exceeds context_length {cfg.context_length}")
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, args.gen_prompt), generator=torch.Generator().manual_seed(2)).to(device)
    modes = {
        "no_cache": dict(use_cache=False),
        "kv_cache": dict(kv_cache="dynamic"),
        "static_cache": dict(kv_cache="static"),
        "compiled_static": dict(kv_cache="compiled"),
    }
    rates: dict[str, list[float]] = {k: [] for k in modes}
    outputs, warmup_s = {}, {}

    def run(name: str) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        outputs[name] = generate(model, idx, args.gen_tokens, **modes[name])
        sync()
        return time.perf_counter() - t

    for name in modes:
        warmup_s[name] = run(name)
    for _ in range(args.gen_reps):
        for name in modes:
            rates[name].append(args.gen_tokens / run(name))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "preset": args.preset,
        "device": str(device),
        "new_tokens": args.gen_tokens,
        "prompt_tokens": args.gen_prompt,
        "same_tokens": all(torch.equal(o, outputs["no_cache"]) for o in outputs.values()),
        **{f"{k}_tokens_per_s": v for k, v in med.items()},
        "warmup_s": warmup_s,
        "all": rates,
        "speedup": med["kv_cache"] / med["no_cache"],
        "static_over_dynamic": med["static_cache"] / med["kv_cache"],
        "compiled_over_dynamic": med["compiled_static"] / med["kv_cache"],
    }
    print(
        f"\ngeneration, {args.preset}, batch 1, {args.gen_prompt}-token prompt, {args.gen_tokens} new tokens, "
        f"{device} (medians of {args.gen_reps}; same tokens: {out['same_tokens']})"
    )
    for k in modes:
        print(
            f"  {k:16s} {med[k]:8.1f} tokens/s  ({med[k] / med['kv_cache']:.2f}x the dynamic cache; "
            f"first call {warmup_s[k]:.1f} s)"
        )
    return out


def compile_setting(text: str) -> bool | str:
    """--compile as TrainConfig.compile takes it: True, False or "auto"."""
    value = {"true": True, "false": False, "auto": "auto"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true|false|auto, got {text!r}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="training steps per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mm-size", type=int, default=2048)
    p.add_argument("--vocab-multiple", type=int, default=1)
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", default="auto", type=compile_setting, help="true | false | auto (on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--accum-batch", type=int, default=16, help="effective batch of the memory comparison (0 = skip)")
    p.add_argument("--gen-tokens", type=int, default=200)
    p.add_argument("--gen-prompt", type=int, default=20)
    p.add_argument("--gen-reps", type=int, default=3, help="0 = skip the generation comparison")
    p.add_argument(
        "--allocator",
        choices=("keep", "default"),
        default="keep",
        help="keep: gptpkg.perf.keep_freed_memory(), as the training stages; default: leave malloc as is",
    )
    p.add_argument("--parts", default="train,memory,generation", help="comma-separated parts to run")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    # As the training stages do (gptpkg.perf.keep_freed_memory); both paths share it.
    kept = keep_freed_memory() if args.allocator == "keep" else False
    if args.rss_child:
        return rss_child(args.rss_child)
    from gptpkg.train import resolve_device

    device = resolve_device(args.device)
    parts = set(args.parts.split(","))
    result: dict = {"torch": torch.__version__, "allocator": "glibc, freed memory kept" if kept else "default"}
    if "train" in parts:
        result["train"] = report(throughput(args, device), args, device)
    if "memory" in parts and args.accum_batch and device.type == "cpu":
        result["memory"] = memory(args)
    if "generation" in parts and args.gen_reps:
        result["generation"] = generation(args, device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def report(t: dict, args, device) -> dict:
    print(
        f"\n{args.preset} B={args.batch_size} T={args.seq_len} on {device} ({t['threads']} threads); "
        f"peak {t['peak_flops'] / 1e9:.1f} GFLOP/s ({t['peak_source']})"
    )
    for name in ("fast", "plain"):
        print(
            f"  {name:5s} {t[name]['tokens_per_s_median']:8.0f} tokens/s  MFU {100 * t[name]['mfu']:5.1f}%"
            + (
                f"   per CPU-second: {t[name]['tokens_per_cpu_s_median']:8.0f} tokens, MFU "
                f"{100 * t[name]['mfu_cpu_time']:5.1f}%"
                if "mfu_cpu_time" in t[name]
                else ""
            )
        )
    print(f"  fast / plain: median {t['fast_over_plain_median']:.2f}x, min {t['fast_over_plain_min']:.2f}x")
    return t


if __name__ == "__main__":
    main()

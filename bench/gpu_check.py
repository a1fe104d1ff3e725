"""Check the GPU half on one GPU in a few minutes: one table, one JSON file.

    bash bench/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to $OUT or gpu_check_out
    python bench/gpu_check.py --out DIR [--cpu-smoke]

Parts, each timed on its own and reported even when another fails:
1. mfu: `bench/train_throughput.py` on gpt2-small at T=1024 (padded vocabulary), fast
   path; MFU against the published dense bf16 peak and against the measured matmul peak.
2. pipeline: every stage of the default pipeline except `package` (BentoML) through
   `python -m gptpkg.cli` on CUDA (device auto), W&B disabled: stage wall times, test
   accuracy against the baseline, export parity and the int8 gate.
3. compile: the default pretrain and finetune_spam (one member) compiled and eager, the
   figures behind `compile: auto`'s choice.
4. gpt2_small: the gpt2-small profile's pretrain and finetune_spam, capped to a few
   hundred steps: wall time against pure step time (compile cost), tokens/s.
5. generation: tokens/s with no cache, the dynamic and static caches and the compiled
   decode step (CUDA graphs), gpt2-small, batch 1, 200 new tokens.

Needs torch, onnx, onnxruntime, tiktoken and the offline data mirror ($GPTPKG_DATA_MIRROR
or ../shared/data); not dagster, dvc, wandb or bentoml. Without a GPU it stops with exit
status 2 unless `--cpu-smoke` (tiny sizes, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gptpkg.config import Paths, load_params  # noqa: E402  (the checkout's gptpkg, installed or not)
from gptpkg.pipeline import planned  # noqa: E402

PATH_KEYS = tuple(Paths.model_fields)
# Every stage of the default pipeline but `package`: the GPU machine has no BentoML.
STAGES = tuple(s for s in planned(load_params(ROOT / "params.yaml")) if s != "package")


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """(exit status, seconds); output appended to `log`."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def stage_args(work: Path, profile: str | None, sets: list[str], data: Path | None = None) -> list[str]:
    """CLI arguments: every path under `work` (raw and processed data under `data`)."""
    data = data or work
    args = [f"--set=paths.{k}={(data if k in ('raw', 'processed') else work) / k}" for k in PATH_KEYS]
    args.append("--set=wandb.mode=disabled")
    args += [f"--set={s}" for s in sets]
    return args + ([f"--profile={profile}"] if profile else [])


def read(work: Path, stage: str, runtime: bool = False) -> dict:
    f = work / "metrics" / ("runtime" if runtime else "") / f"{stage}.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def pipeline(out: Path, log: Path, smoke: bool, env: dict) -> dict:
    work, profile = out / "pipeline", ("tiny" if smoke else None)
    sets = ["export_onnx.min_test_accuracy=0.0"] if smoke else []
    res: dict = {"stages": {}}
    for stage in STAGES:
        rc, wall = run(
            [sys.executable, "-m", "gptpkg.cli", stage, "--no-progress", *stage_args(work, profile, sets)],
            log,
            900,
            env,
        )
        res["stages"][stage] = {"rc": rc, "wall_s": round(wall, 1), **read(work, stage, runtime=True)}
        if rc:
            res["failed"] = stage
            return res
    spam, base, exp = read(work, "finetune_spam"), read(work, "baseline_spam"), read(work, "export_onnx")
    res.update(
        test_accuracy=spam.get("test_accuracy"),
        baseline_test_accuracy=base.get("test_accuracy"),
        parity_max_abs_logit_diff=exp.get("parity_max_abs_logit_diff"),
        int8_kept=exp.get("int8_kept"),
    )
    return res


def gpt2_small(out: Path, log: Path, smoke: bool, env: dict) -> dict:
    """The gpt2-small profile on the pipeline part's prepared data, capped: stage wall time
    against its pure training time (the difference is compile and evaluation cost)."""
    work, steps, data = out / "gpt2_small", (4 if smoke else 300), out / "pipeline"
    prof = "tiny" if smoke else "gpt2-small"
    base = [
        f"pretrain.max_steps={steps}",
        f"finetune_spam.max_steps={steps}",
        "finetune_spam.soup=1",
        "export_onnx.min_test_accuracy=0.0",
    ] + (["pretrain.device=cpu", "finetune_spam.device=cpu"] if smoke else [])
    res = {}
    have_data = (data / "processed").is_dir()
    for stage in ("pretrain", "finetune_spam") if have_data else ("fetch", "prepare", "pretrain", "finetune_spam"):
        cmd = [sys.executable, "-m", "gptpkg.cli", stage, "--no-progress", *stage_args(work, prof, base, data)]
        rc, _ = run(cmd, log, 900, env)
        if stage in ("pretrain", "finetune_spam"):
            rt, m = read(work, stage, runtime=True), read(work, stage)
            res[stage] = {
                "rc": rc,
                "stage_wall_s": rt.get("stage_wall_time_s"),
                "train_wall_s": rt.get("wall_time_s"),
                "tokens_per_s": rt.get("tokens_per_s"),
                "steps": m.get("steps"),
                "mfu": rt.get("mfu"),
            }
        if rc:
            res["failed"] = stage
            break
    return res


def compile_choice(out: Path, log: Path, smoke: bool, env: dict) -> dict:
    """The default pretrain and finetune_spam (one soup member) with compile true and
    false on the pipeline part's prepared data: stage wall times, against which
    `compile: auto`'s choice (eager for these) is checked."""
    data, res = out / "pipeline", {}
    sets = ["finetune_spam.soup=1"]
    sets += ["pretrain.max_steps=4", "finetune_spam.max_steps=4"] if smoke else []
    for stage in ("pretrain", "finetune_spam"):
        for setting in ("false", "true"):
            work = out / f"compile_{setting}"
            cmd = [sys.executable, "-m", "gptpkg.cli", stage, "--no-progress"]
            cmd += stage_args(work, "tiny" if smoke else None, [*sets, f"{stage}.compile={setting}"], data)
            rc, wall = run(cmd, log, 900, env)
            res[f"{stage}_compile_{setting}"] = {"rc": rc, **read(work, stage, runtime=True), "wall_s": round(wall, 1)}
            if rc:
                res["failed"] = stage
                return res
    return res


def bench(out: Path, log: Path, smoke: bool, parts: str, env: dict) -> dict:
    dest = out / f"{parts}.json"
    size = (
        ["--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--steps", "2", "--reps", "1"]
        if smoke
        else [
            "--preset",
            "gpt2-small",
            "--seq-len",
            "1024",
            "--vocab-multiple",
            "64",
            "--batch-size",
            "16",
            "--reps",
            "3",
        ]
    )
    gen = ["--gen-reps", "1", "--gen-tokens", "20"] if smoke else ["--gen-reps", "3", "--gen-tokens", "200"]
    device = ["--device", "cpu" if smoke else "cuda"]
    rc, _ = run(
        [sys.executable, "bench/train_throughput.py", "--parts", parts, *size, *gen, *device, "--json", str(dest)],
        log,
        600,
        env,
    )
    return {"rc": rc, **(json.loads(dest.read_text()) if dest.is_file() else {})}


def table(results: dict) -> str:
    rows = [("part", "figure", "value")]
    fast = results.get("mfu", {}).get("fast", {})
    if fast:
        rows.append(("mfu", "gpt2-small T=1024 tokens/s", f"{fast['tokens_per_s_median']:.0f}"))
        rows.append(("mfu", "MFU vs published bf16 peak", f"{100 * fast['mfu']:.1f}%"))
        measured = results["mfu"].get("peak_flops_all") or []
        if measured:
            mfu_m = (
                results["mfu"]["flops_per_token"] * fast["tokens_per_s_median"] / sorted(measured)[len(measured) // 2]
            )
            rows.append(("mfu", "MFU vs measured matmul peak", f"{100 * mfu_m:.1f}%"))
    pipe = results.get("pipeline", {})
    for stage, s in pipe.get("stages", {}).items():
        rows.append(("pipeline", f"{stage} wall s (rc {s['rc']})", f"{s.get('stage_wall_time_s', s['wall_s']):.1f}"))
    for k in ("test_accuracy", "baseline_test_accuracy", "parity_max_abs_logit_diff", "int8_kept"):
        if pipe.get(k) is not None:
            rows.append(("pipeline", k, str(pipe[k])))
    for stage, s in results.get("gpt2_small", {}).items():
        if isinstance(s, dict) and s.get("stage_wall_s") and s.get("train_wall_s"):
            rows.append(
                ("gpt2_small", f"{stage} stage / train wall", f"{s['stage_wall_s']:.0f} s / {s['train_wall_s']:.0f} s")
            )
    for name, s in results.get("compile", {}).items():
        if isinstance(s, dict) and s.get("stage_wall_time_s"):
            rows.append(("compile", f"{name} stage wall s", f"{s['stage_wall_time_s']:.1f}"))
    gen = results.get("generation", {}).get("generation") or {}
    for name in ("no_cache", "kv_cache", "static_cache", "compiled_static"):
        if f"{name}_tokens_per_s" in gen:
            rows.append(("generation", f"{name} tokens/s ({gen['preset']})", f"{gen[f'{name}_tokens_per_s']:.0f}"))
    if "same_tokens" in gen:
        rows.append(("generation", "same tokens in every mode", str(gen["same_tokens"])))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the JSON and logs")
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU needed: tiny sizes, to check this script")
    ap.add_argument("--parts", default="mfu,pipeline,compile,gpt2_small,generation")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, "
            "or pass --cpu-smoke to check the script itself",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    mirror = ROOT.parent / "shared" / "data"
    if "GPTPKG_DATA_MIRROR" not in env and mirror.is_dir():
        env["GPTPKG_DATA_MIRROR"] = str(mirror)
    results: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    t0 = time.perf_counter()
    for part in args.parts.split(","):
        start = time.perf_counter()
        if part == "mfu":
            results[part] = bench(out, log, args.cpu_smoke, "train", env)
        elif part == "generation":
            results[part] = bench(out, log, args.cpu_smoke, "generation", env)
        elif part == "pipeline":
            results[part] = pipeline(out, log, args.cpu_smoke, env)
        elif part == "compile":
            results[part] = compile_choice(out, log, args.cpu_smoke, env)
        elif part == "gpt2_small":
            results[part] = gpt2_small(out, log, args.cpu_smoke, env)
        else:
            print(f"gpu_check: unknown part {part!r}", file=sys.stderr)
            return 2
        results[part]["part_wall_s"] = round(time.perf_counter() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"{results['device']}, torch {results['torch']}, {results['date']}, {results['total_wall_s']} s\n")
    print(table(results))
    print(f"\nJSON: {out / 'gpu_check.json'}   log: {log}")
    failed = [p for p, r in results.items() if isinstance(r, dict) and (r.get("rc") or r.get("failed"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

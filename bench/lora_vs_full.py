"""LoRA against full fine-tuning on the default CPU classifier, side by side in one run.

    GPTPKG_DATA_MIRROR=/work/shared/data PYTHONPATH=. python bench/lora_vs_full.py --workspace /tmp/lora-bench

The workspace is a copy of this repository's params.yaml in which fetch, prepare and
pretrain run first (skipped when its pretrained checkpoint is there). Then the real
`finetune_spam` stage runs once per variant, each in its own process (`gptpkg
finetune_spam --set ...`, soup 1, W&B off), in interleaved repetitions:

- `full`: params.yaml's finetune_spam (trainable: all);
- `lora`: the same with trainable: lora (params.yaml's lora_* keys: rank 16, alpha 16,
  every linear layer of every block; the head trains in full).

Reports per variant: trainable parameters, step time (the training loop's wall time /
steps), peak resident memory of the process (wait4's ru_maxrss), the checkpoint's size,
and val / test accuracy; medians over repetitions. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": [], "lora": ["finetune_spam.trainable=lora"]}


def gptpkg(ws: Path, *args: str) -> tuple[int, float]:
    """Run `gptpkg ARGS` in `ws`; (exit status, peak RSS in MiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "gptpkg.cli", *args, "--no-progress"], cwd=ws, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def prepare(ws: Path) -> None:
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / "params.yaml").is_file():
        shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    if (ws / "models" / "pretrained" / "model.safetensors").is_file():
        return
    for stage in ("fetch", "prepare", "pretrain"):
        t0 = time.perf_counter()
        rc, _ = gptpkg(ws, stage, "--set", "wandb.mode=disabled")
        if rc:
            sys.exit(f"{stage} failed ({rc})")
        print(f"{stage}: {time.perf_counter() - t0:.0f} s", flush=True)


def run_variant(ws: Path, name: str, rep: int) -> dict:
    tag = f"{name}-{rep}"
    sets = [
        "wandb.mode=disabled",
        "finetune_spam.soup=1",
        f"paths.spam_classifier=models/bench/{tag}",
        f"paths.metrics=metrics/bench/{tag}",
        f"paths.plots=plots/bench/{tag}",
        *VARIANTS[name],
    ]
    rc, rss = gptpkg(ws, "finetune_spam", *[a for s in sets for a in ("--set", s)])
    if rc:
        sys.exit(f"finetune_spam {tag} failed ({rc})")
    m = json.loads((ws / "metrics" / "bench" / tag / "finetune_spam.json").read_text())
    rt = json.loads((ws / "metrics" / "bench" / tag / "runtime" / "finetune_spam.json").read_text())
    ckpt = ws / "models" / "bench" / tag / "model.safetensors"
    return {
        "trainable_params": m["n_trainable_params"],
        "steps": m["steps"],
        "step_time_ms": 1000 * rt["wall_time_s"] / m["steps"],
        "peak_rss_mib": rss,
        "checkpoint_mib": ckpt.stat().st_size / 2**20,
        "val_accuracy": m["val_accuracy"],
        "test_accuracy": m["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_vs_full.json")
    args = ap.parse_args()
    prepare(args.workspace)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        for name in VARIANTS if rep % 2 == 0 else reversed(VARIANTS):  # interleaved, order alternating
            runs[name].append(run_variant(args.workspace, name, rep))
            print(name, rep, json.dumps(runs[name][-1]), flush=True)
    median = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    ratio = {k: median["lora"][k] / median["full"][k] for k in median["full"] if median["full"][k]}
    result = {"reps": args.reps, "median": median, "lora_over_full": ratio, "runs": runs, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"median": median, "lora_over_full": ratio}, indent=2))


if __name__ == "__main__":
    main()

"""Time the whole default pipeline as a user runs it: a fresh `git clone` of this repo
(HEAD) in a temp folder, `dvc repro`, then per-stage wall and CPU time from
metrics/runtime/<stage>.json and the headline figures from metrics/<stage>.json.

    python bench/pipeline_time.py [--rev REV] [--profile NAME] [--keep DIR] [--png OUT.png]
    python bench/pipeline_time.py --report DIR      # the tables of a finished run in DIR

Needs the offline mirror (../shared/data or $GPTPKG_DATA_MIRROR) or the internet. W&B
runs offline. On a busy machine, wall time grows with the load; CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {
    "pretrain": ["val_loss", "val_perplexity", "steps", "tokens_seen"],
    "finetune_spam": ["test_accuracy", "test_spam_f1", "val_accuracy", "train_accuracy"],
    "baseline_spam": ["test_accuracy", "test_spam_f1"],
    "finetune_instruct": [
        "test_rouge_l",
        "val_rouge_l",
        "test_distinct_answers",
        "test_exact_match",
        "test_loss",
        "val_loss",
    ],
    "baseline_instruct": ["test_rouge_l", "val_rouge_l", "test_exact_match"],
    "export_onnx": ["parity_max_abs_logit_diff", "parity_label_mismatches", "int8_kept"],
}


def stage_names(work: Path) -> list[str]:
    """The stages `dvc repro` ran in `work`: those of its dvc.yaml, in order."""
    return list(yaml.safe_load((work / "dvc.yaml").read_text(encoding="utf-8"))["stages"])


def report(work: Path, total: float | None) -> None:
    print(f"\n{'stage':18s} {'wall s':>8s} {'cpu s':>8s}")
    walls = 0.0
    for s in stage_names(work):
        rt = json.loads((work / "metrics" / "runtime" / f"{s}.json").read_text())
        walls += rt["stage_wall_time_s"]
        print(f"{s:18s} {rt['stage_wall_time_s']:8.1f} {rt.get('stage_cpu_time_s', float('nan')):8.1f}")
    print(f"{'sum of stages':18s} {walls:8.1f}")
    if total is not None:
        print(f"{'dvc repro total':18s} {total:8.1f}   (cores: {os.cpu_count()}, load avg: {os.getloadavg()[0]:.1f})")
    for s, keys in HEADLINE.items():
        f = work / "metrics" / f"{s}.json"
        if not f.is_file():  # a stage the run's revision does not have
            continue
        m = json.loads(f.read_text())
        print(
            f"{s}: "
            + ", ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rev",
        help="check out this commit of the clone first (default: HEAD); run two at once to compare them side by side",
    )
    ap.add_argument("--profile", help="write profiles/NAME.yaml into params.yaml first")
    ap.add_argument("--keep", help="clone into this folder (kept) instead of a temp folder")
    ap.add_argument("--png", help="copy plots/pretrain_loss.png here afterwards")
    ap.add_argument("--report", help="only print the tables of a finished run in this folder")
    args = ap.parse_args()
    if args.report:
        report(Path(args.report), None)
        return 0

    bin_dir = Path(sys.executable).parent
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gptpkg-pipeline-"))
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(work),
        WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
        BENTOML_HOME=os.environ.get("BENTOML_HOME", str(work / "bentoml-home")),
    )
    mirror = ROOT.parent / "shared" / "data"
    if "GPTPKG_DATA_MIRROR" not in env and mirror.is_dir():
        env["GPTPKG_DATA_MIRROR"] = str(mirror)  # the clone lives elsewhere: ../shared/data would miss
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        if args.rev:
            subprocess.run(["git", "checkout", "-q", args.rev], cwd=work, check=True)
        if args.profile:
            subprocess.run([str(bin_dir / "gptpkg"), "profile", args.profile], cwd=work, env=env, check=True)
        t0 = time.perf_counter()
        subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=work, env=env, check=True)
        total = time.perf_counter() - t0
        report(work, total)
        if args.png:
            shutil.copy(work / "plots" / "pretrain_loss.png", args.png)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

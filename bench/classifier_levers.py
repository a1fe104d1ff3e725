"""What makes the from-scratch spam classifier beat TF-IDF + logistic regression?

Runs a list of configurations (each a set of `section.key=value` overrides of
params.yaml, exactly what `gptpkg <stage> --set` and `dvc exp run -S` take) through the
real stage functions in a work folder, and prints one table row per configuration:
validation and test accuracy on the book's balanced split, spam F1, the same on all
messages minus the training messages (imbalanced, "heldout_full"), and minutes of
pretrain + finetune_spam. The baseline row runs `baseline_spam` on the same split.

Choose by validation accuracy only; the test columns are reported, never used to choose.

    PYTHONPATH=$PWD GPTPKG_DATA_MIRROR=/work/shared/data WANDB_MODE=disabled \
        nice -n 10 python bench/classifier_levers.py --workdir /tmp/levers [--only NAME ...]

Results are appended to <workdir>/results.jsonl (a configuration already there is not
rerun unless --force), so the table can be rebuilt with --table-only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides. Pretrain overrides decide the pretrained checkpoint (shared by
# configurations with the same ones); finetune_spam overrides only fine-tune.
# Pretrain and finetune_spam keys as they were before issue 7 (cpu-mini on the-verdict).
OLD_PRETRAIN = {
    "pretrain.corpus": "[the-verdict.txt]", "pretrain.max_length": "256", "pretrain.stride": "128",
    "pretrain.drop_rate": "0.1", "pretrain.lr": "0.0004", "pretrain.epochs": "10.0", "pretrain.max_steps": "0",
    "pretrain.batch_size": "4", "pretrain.eval_every": "10"}
OLD_FINETUNE = {
    "finetune_spam.train_data": "book", "finetune_spam.class_weights": "null",
    "finetune_spam.freeze_embeddings": "false", "finetune_spam.lr": "0.0002", "finetune_spam.epochs": "3.0",
    "finetune_spam.batch_size": "8", "finetune_spam.eval_every": "50"}
CONFIGS: dict[str, dict[str, str]] = {
    "baseline: tfidf+logreg, book train": {"baseline": "1"},
    "baseline: tfidf+logreg, all train": {"baseline": "1", "baseline_spam.train_data": "all"},
    "old defaults: verdict pretrain, book train": {**OLD_PRETRAIN, **OLD_FINETUNE},
    "verdict pretrain, all train (new finetune)": {**OLD_PRETRAIN},
    "no pretrain (scratch), all train": {"finetune_spam.init": "scratch", "finetune_spam.freeze_embeddings": "false"},
    "sms pretrain, book train (old finetune)": {**OLD_FINETUNE},
    "sms pretrain, all train, frozen embeddings": {"finetune_spam.freeze_embeddings": "true"},
    "shipped defaults: sms pretrain, all train": {},
    "sms pretrain 200 steps, all train": {"pretrain.max_steps": "200"},
    "sms pretrain 300 steps, all train": {"pretrain.max_steps": "300"},
}


def _split(overrides: dict[str, str]) -> tuple[list[str], list[str]]:
    pre = [f"{k}={v}" for k, v in sorted(overrides.items()) if k.startswith("pretrain.")]
    rest = [f"{k}={v}" for k, v in sorted(overrides.items()) if not k.startswith("pretrain.") and k != "baseline"]
    return pre, rest


def _cpu_s() -> float:
    """CPU seconds of this process, all threads: the machine is shared, so wall time
    depends on the neighbours; CPU time does not (an idle 2-core machine runs two
    threads, so wall time there is between cpu/2 and cpu)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_config(name: str, overrides: dict[str, str], work: Path) -> dict:
    from gptpkg.config import load_params
    from gptpkg.runner import run_stage

    pre, rest = _split(overrides)
    tag = hashlib.sha1("\n".join(pre).encode()).hexdigest()[:10]
    common = [f"paths.pretrained=models/pretrained-{tag}", "wandb.mode=disabled"]
    params = load_params(work / "params.yaml", pre + rest + common)
    row: dict = {"name": name, "overrides": overrides}
    cpu0 = _cpu_s()
    if "baseline" in overrides:
        t0 = time.perf_counter()
        m = run_stage("baseline_spam", params, progress=False)
        row["minutes"] = (time.perf_counter() - t0) / 60
        row["cpu_minutes"] = (_cpu_s() - cpu0) / 60
    else:
        pre_metrics_file = work / f"models/pretrained-{tag}.metrics.json"
        if overrides.get("finetune_spam.init") == "scratch":
            pm = {"wall_time_s": 0.0, "cpu_s": 0.0, "val_loss": None, "steps": 0}
        elif not pre_metrics_file.is_file():
            pm = run_stage("pretrain", params, progress=False)
            pm = {k: pm[k] for k in ("wall_time_s", "val_loss", "steps")} | {"cpu_s": _cpu_s() - cpu0}
            pre_metrics_file.write_text(json.dumps(pm))
        else:
            pm = json.loads(pre_metrics_file.read_text())
        cpu1 = _cpu_s()
        m = run_stage("finetune_spam", params, progress=False)
        row["cpu_minutes"] = (pm["cpu_s"] + _cpu_s() - cpu1) / 60
        row.update(pretrain_minutes=pm["wall_time_s"] / 60, pretrain_val_loss=pm["val_loss"],
                   pretrain_steps=pm["steps"], finetune_minutes=m["wall_time_s"] / 60,
                   minutes=(pm["wall_time_s"] + m["wall_time_s"]) / 60, finetune_steps=m["steps"])
    for k in ("val_accuracy", "val_spam_f1", "test_accuracy", "test_spam_f1",
              "heldout_full_accuracy", "heldout_full_spam_f1", "train_messages", "heldout_full_messages"):
        row[k] = m[k]
    return row


def table(rows: list[dict]) -> str:
    head = ("| configuration | val acc | test acc | test spam F1 | heldout_full acc | heldout_full spam F1 "
            "| wall minutes (pretrain + finetune) | CPU minutes |")
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        mins = (f"{r['minutes']:.1f} ({r['pretrain_minutes']:.1f} + {r['finetune_minutes']:.1f})"
                if "pretrain_minutes" in r else f"{r['minutes'] * 60:.1f} s")
        lines.append(f"| {r['name']} | {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} | {r['test_spam_f1']:.4f} "
                     f"| {r['heldout_full_accuracy']:.2%} | {r['heldout_full_spam_f1']:.4f} | {mins} "
                     f"| {r['cpu_minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    ap.add_argument("--force", action="store_true", help="rerun configurations already in results.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in results.read_text().splitlines()} if results.is_file() else {}
    if not args.table_only:
        os.environ.setdefault("WANDB_MODE", "disabled")
        shutil.copy(ROOT / "params.yaml", work / "params.yaml")
        shutil.copytree(ROOT / "profiles", work / "profiles", dirs_exist_ok=True)
        os.chdir(work)
        from gptpkg.config import load_params
        from gptpkg.runner import run_stage

        base = load_params(work / "params.yaml", ["wandb.mode=disabled"])
        if not (work / "data/processed/spam/all.jsonl").is_file():
            run_stage("fetch", base, progress=False)
            run_stage("prepare", base, progress=False)
        for name, overrides in CONFIGS.items():
            if (args.only and name not in args.only) or (name in done and not args.force):
                continue
            print(f"== {name}", flush=True)
            done[name] = run_config(name, overrides, work)
            with results.open("a") as f:
                f.write(json.dumps(done[name]) + "\n")
    print(table([done[n] for n in CONFIGS if n in done]))


if __name__ == "__main__":
    main()

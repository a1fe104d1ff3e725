"""What makes the from-scratch spam classifier beat TF-IDF + logistic regression?

Each lever of issue 7 is a set of `section.key=value` overrides of params.yaml; this
script runs each as a real DVC experiment of this repository and tabulates them from
`dvc exp show`:

    python bench/classifier_experiments.py run [NAME ...]    # dvc exp run -n NAME -S ... per lever
    python bench/classifier_experiments.py table             # Markdown table from `dvc exp show --json`

`run` needs a git + DVC workspace of this project (the README's setup) with no
uncommitted params.yaml changes; it runs `dvc exp run -n <name> -S <override> ...
finetune_spam baseline_spam` for every lever not yet in `dvc exp list`, one after the
other in the workspace, and puts params.yaml back after each. DVC reruns only the stages
a lever changes (a pretraining lever reruns pretrain; the others reuse it).

The table has, per experiment: validation and test accuracy on the book's balanced
split, test spam F1, the held-out figures re-weighted to the collection's ~13% spam
(`heldout_traffic_*`, see `gptpkg.metrics.at_spam_share`), the baseline's test accuracy
in the same run, and the minutes of pretrain + finetune_spam (their stage wall times).
Choose by validation accuracy, then validation loss; the test columns are reported,
never used to choose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides (as `dvc exp run -S` takes them). The defaults in params.yaml are the
# row named "defaults"; every other row changes one lever (or a pair that belongs
# together) from them.
LEVERS: dict[str, list[str]] = {
    "defaults": [],
    # seed noise: the same configuration, other fine-tuning seeds (batch order, head init)
    "seed=2": ["finetune_spam.seed=2"],
    "seed=3": ["finetune_spam.seed=3"],
    # the classifier's pooling: the mean over the real tokens vs the last real token
    "pooling=mean": ["finetune_spam.pooling=mean"],
    # training data: the book's balanced 1,045 messages vs every non-val/test message
    "train_data=book (balanced), no class weights": ["finetune_spam.train_data=book",
                                                     "finetune_spam.class_weights=null"],
    "class_weights=[1,1]": ["finetune_spam.class_weights=[1.0,1.0]"],
    "class_weights=[1,6]": ["finetune_spam.class_weights=[1.0,6.0]"],
    "class_weights=[1,9.5] (inverse frequency)": ["finetune_spam.class_weights=[1.0,9.5]"],
    # which layers train
    "trainable=last_blocks (1 block + head, the book's)": ["finetune_spam.trainable=last_blocks"],
    "freeze_embeddings=true": ["finetune_spam.freeze_embeddings=true"],
    # learning rate and schedule
    "lr=0.001": ["finetune_spam.lr=0.001"],
    "lr=0.0002": ["finetune_spam.lr=0.0002"],
    "epochs=4": ["finetune_spam.epochs=4.0"],
    "min_lr_ratio=1.0 (constant lr after warmup)": ["finetune_spam.min_lr_ratio=1.0"],
    # pretraining: none, the book's corpus, more text, more steps
    "no pretraining (init=scratch)": ["finetune_spam.init=scratch"],
    "pretrain corpus=[the-verdict.txt] (the book's)": ["pretrain.corpus=[the-verdict.txt]"],
    "pretrain corpus=[sms, tinyshakespeare, verdict], 300 steps":
        ["pretrain.corpus=[sms,tinyshakespeare.txt,the-verdict.txt]", "pretrain.max_steps=300"],
    "pretrain 206 steps (2 epochs of the SMS corpus)": ["pretrain.max_steps=300"],
    # model size and context
    "model=cpu-small (d=256, 6 layers), 206 pretrain steps": ["pretrain.model=cpu-small", "pretrain.max_steps=300"],
    "max_length=64": ["finetune_spam.max_length=64"],
    # the baseline on the classifier's training data (imbalanced, no class weights)
    "baseline_spam.train_data=all": ["baseline_spam.train_data=all"],
}

TARGETS = ["finetune_spam", "baseline_spam"]


def _dvc(*args: str, capture: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, text=True,
                          capture_output=capture, check=False)
    if proc.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    return proc.stdout or ""


def run(names: list[str]) -> None:
    dirty = subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=ROOT, text=True,
                           capture_output=True, check=True).stdout.strip()
    if dirty:
        raise SystemExit("params.yaml has uncommitted changes; commit or revert them first "
                         "(every experiment is relative to the committed params)")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; expected names from {list(LEVERS)}")
    done = set(_dvc("exp", "list", "--name-only", capture=True).split())
    for name, overrides in LEVERS.items():
        exp = exp_name(name)
        if (names and name not in names) or exp in done:
            continue
        print(f"== {name}: dvc exp run -n {exp} " + " ".join(f"-S {o}" for o in overrides), flush=True)
        try:
            _dvc("exp", "run", "-n", exp, *[a for o in overrides for a in ("-S", o)], *TARGETS)
        finally:
            subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=ROOT, check=True)


def exp_name(lever: str) -> str:
    """A DVC experiment name (a git ref component) for a lever's description."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in lever)
    return "-".join(p for p in keep.split("-") if p)[:60]


def _get(data: dict, file: str, key: str):
    return ((data.get("metrics") or {}).get(file) or {}).get("data", {}).get(key)


def rows_from_exp_show(show: list[dict]) -> list[dict]:
    """One row per experiment named in LEVERS, from `dvc exp show --json -A`."""
    names = {exp_name(n): n for n in LEVERS}
    rows = []
    for commit in show:
        for exp in commit.get("experiments") or []:
            rev = exp["revs"][0]
            if rev.get("name") not in names or not rev.get("data"):
                continue
            d = rev["data"]
            mins = sum(_get(d, f"metrics/runtime/{s}.json", "stage_wall_time_s") or 0.0
                       for s in ("pretrain", "finetune_spam")) / 60
            rows.append({"lever": names[rev["name"]], "experiment": rev["name"],
                         "val_accuracy": _get(d, "metrics/finetune_spam.json", "val_accuracy"),
                         "test_accuracy": _get(d, "metrics/finetune_spam.json", "test_accuracy"),
                         "test_spam_f1": _get(d, "metrics/finetune_spam.json", "test_spam_f1"),
                         "traffic_accuracy": _get(d, "metrics/finetune_spam.json", "heldout_traffic_accuracy"),
                         "traffic_spam_f1": _get(d, "metrics/finetune_spam.json", "heldout_traffic_spam_f1"),
                         "baseline_test_accuracy": _get(d, "metrics/baseline_spam.json", "test_accuracy"),
                         "baseline_traffic_accuracy": _get(d, "metrics/baseline_spam.json", "heldout_traffic_accuracy"),
                         "baseline_traffic_spam_f1": _get(d, "metrics/baseline_spam.json", "heldout_traffic_spam_f1"),
                         "minutes": mins})
    order = list(LEVERS)
    return sorted(rows, key=lambda r: order.index(r["lever"]))


def markdown(rows: list[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    f4 = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| lever (change from the defaults) | val acc | test acc | test spam F1 | traffic acc "
             "| traffic spam F1 | baseline test acc | baseline traffic acc | baseline traffic spam F1 | minutes |",
             "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['lever']} | {pct(r['val_accuracy'])} | {pct(r['test_accuracy'])} "
                     f"| {f4(r['test_spam_f1'])} | {pct(r['traffic_accuracy'])} | {f4(r['traffic_spam_f1'])} "
                     f"| {pct(r['baseline_test_accuracy'])} | {pct(r['baseline_traffic_accuracy'])} "
                     f"| {f4(r['baseline_traffic_spam_f1'])} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the levers not yet in `dvc exp list`")
    r.add_argument("names", nargs="*", help="lever names (default: all)")
    sub.add_parser("table", help="print the Markdown table from `dvc exp show --json -A`")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.names)
    else:
        print(markdown(rows_from_exp_show(json.loads(_dvc("exp", "show", "--json", "-A", capture=True)))))


if __name__ == "__main__":
    main()

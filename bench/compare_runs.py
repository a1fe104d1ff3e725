"""Compare two finished pipeline workspaces (e.g. `bench/pipeline_time.py --keep DIR` at
two commits): do they hold the same results?

    python bench/compare_runs.py BEFORE_DIR AFTER_DIR

- metrics/*.json: byte-identical, else which keys differ (keys that moved into
  metrics/runtime/<stage>.json are named as moved, not as changed);
- plots/*.json: identical, or identical once the timing fields are left out;
- models/**/model.safetensors: equal tensor for tensor (torch.equal); a classifier saved in
  the old layout (`out_head.*` and unprefixed backbone keys) is compared after mapping its
  keys to `head.*` / `backbone.*`;
- models/**/*.onnx: byte-identical or not.

Exit status 0 when every model tensor and every metrics figure is equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMING = {"elapsed_s", "tokens_per_s"}


def new_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An old-layout classifier's keys as today's GPTClassifier names them."""
    if "out_head.weight" not in state or any(k.startswith("backbone.") for k in state):
        return state
    return {
        ("head." + k[len("out_head.") :]) if k.startswith("out_head.") else "backbone." + k: v for k, v in state.items()
    }


def compare_metrics(a: Path, b: Path) -> int:
    bad = 0
    for f in sorted((a / "metrics").glob("*.json")):
        g = b / "metrics" / f.name
        if g.is_file() and f.read_bytes() == g.read_bytes():
            print(f"same       metrics/{f.name}")
            continue
        x, y = json.loads(f.read_text()), json.loads(g.read_text()) if g.is_file() else {}
        if not isinstance(x, dict):
            bad += 1
            print(f"DIFFERENT  metrics/{f.name}")
            continue
        rt = b / "metrics" / "runtime" / f.name
        runtime = json.loads(rt.read_text()) if rt.is_file() else {}
        moved = sorted(k for k in x if k not in y and runtime.get(k) == x[k])
        changed = sorted(k for k in x if k not in moved and x[k] != y.get(k))
        bad += bool(changed)
        print(
            f"{'DIFFERENT' if changed else 'same figs'}  metrics/{f.name}: changed {changed}, moved to runtime {moved}"
        )
    return bad


def compare_plots(a: Path, b: Path) -> None:
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows] if isinstance(rows, list) else rows

    for f in sorted((a / "plots").glob("*.json")):
        g = b / "plots" / f.name
        if not g.is_file():
            print(f"missing    plots/{f.name}")
        elif f.read_bytes() == g.read_bytes():
            print(f"same       plots/{f.name}")
        else:
            same = strip(json.loads(f.read_text())) == strip(json.loads(g.read_text()))
            print(f"{'same' if same else 'DIFFERENT'} {'but timings' if same else ''}  plots/{f.name}")


def compare_models(a: Path, b: Path) -> int:
    bad = 0
    for f in sorted((a / "models").rglob("*.safetensors")):
        g = b / f.relative_to(a)
        x, y = new_layout(load_file(str(f))), new_layout(load_file(str(g))) if g.is_file() else {}
        equal = set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
        bad += not equal
        print(f"{'equal' if equal else 'DIFFERENT'}      {f.relative_to(a)} ({len(x)} tensors)")
    for f in sorted((a / "models").rglob("*.onnx")):
        g = b / f.relative_to(a)
        same = g.is_file() and f.read_bytes() == g.read_bytes()
        print(f"{'same' if same else 'other bytes'}  {f.relative_to(a)}")
    return bad


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    bad = compare_metrics(a, b)
    compare_plots(a, b)
    bad += compare_models(a, b)
    print("same results" if not bad else f"{bad} difference(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Plot files of a stage: the per-eval history as JSON (DVC plots), the test confusion
matrix as (actual, predicted) rows (DVC's confusion template), and PNGs of both rendered
with matplotlib (headless), so a figure exists without `dvc plots show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes, atomic_write_text

LABELS = ("ham", "spam")


def write_history(plots_dir: str | Path, stage: str, history: list[dict[str, Any]]) -> Path:
    out = Path(plots_dir) / f"{stage}.json"
    atomic_write_text(out, json.dumps(history, indent=1) + "\n")
    return out


def confusion_rows(confusion: list[list[int]], labels=LABELS) -> list[dict[str, str]]:
    """[[tn, fp], [fn, tp]] (rows = truth, columns = prediction) back to one
    {"actual", "predicted"} row per test item: the input of DVC's confusion template."""
    return [
        {"actual": labels[t], "predicted": labels[p]}
        for t, row in enumerate(confusion)
        for p, n in enumerate(row)
        for _ in range(int(n))
    ]


def write_confusion(plots_dir: str | Path, stage: str, confusion: list[list[int]]) -> Path:
    out = Path(plots_dir) / f"{stage}_confusion.json"
    atomic_write_text(out, json.dumps(confusion_rows(confusion)) + "\n")
    return out


def write_item_scores(plots_dir: str | Path, stage: str, rows: list[dict[str, Any]]) -> Path:
    """Per-item scores of a stage's test answers ({"item", "rouge_l", ...} rows)."""
    out = Path(plots_dir) / f"{stage}_scores.json"
    atomic_write_text(out, json.dumps(rows) + "\n")
    return out


def _save(fig, out: Path, ax=None, title: str | None = None) -> None:
    """Title, tight layout, then an atomic, byte-reproducible PNG write."""
    import io

    if ax is not None and title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})  # no timestamp: same bytes
    atomic_write_bytes(out, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def render_curves(history: list[dict[str, Any]], out: str | Path, title: str) -> Path:
    """Train/val loss against step; a second axis for val accuracy when present."""
    plt = _pyplot()
    out = Path(out)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    try:
        for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
            pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        acc = [(r["step"], r["val_accuracy"]) for r in history if isinstance(r.get("val_accuracy"), (int, float))]
        handles, labels = ax.get_legend_handles_labels()
        if acc:
            ax2 = ax.twinx()
            ax2.plot(*zip(*acc), "-^", color="tab:green", markersize=3, label="val accuracy")
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(0, 1.02)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="best", fontsize=8)
        _save(fig, out, ax, title)
    finally:
        plt.close(fig)
    return out


def render_confusion(confusion: list[list[int]], out: str | Path, title: str, labels=LABELS) -> Path:
    plt = _pyplot()
    out = Path(out)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    try:
        ax.imshow(confusion, cmap="Blues")
        top = max(max(r) for r in confusion) or 1
        for t, row in enumerate(confusion):
            for p, n in enumerate(row):
                ax.text(p, t, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        _save(fig, out, ax, title)
    finally:
        plt.close(fig)
    return out


def write_stage_plots(
    plots_dir: str | Path, stage: str, history: list[dict[str, Any]] | None, metrics: dict[str, Any]
) -> list[Path]:
    """Every plot file of `stage` (the ones dvc.yaml declares for it)."""
    plots_dir = Path(plots_dir)
    written = []
    if history is not None:
        written.append(write_history(plots_dir, stage, history))
        written.append(render_curves(history, plots_dir / f"{stage}_loss.png", f"{stage}: loss per eval"))
    confusion = metrics.get("test_confusion")
    if confusion is not None:
        written.append(write_confusion(plots_dir, stage, confusion))
        written.append(render_confusion(confusion, plots_dir / f"{stage}_confusion.png", f"{stage}: test set"))
    return written

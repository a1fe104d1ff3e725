"""Asset checks over the metrics files the stages write (read from the DVC workspace).
A check exists only when its stage is in dvc.yaml."""

import math
from collections.abc import Callable

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetChecksDefinition, AssetCheckSeverity, asset_check

from .assets import read_json
from .dvc_project import Stage
from .resources import DvcWorkspace


def _metrics(dvc: DvcWorkspace, stage: Stage) -> tuple[dict | None, str]:
    rel = stage.metrics_file() or f"metrics/{stage.name}.json"
    return read_json(dvc.path / rel), rel


def _missing(rel: str, keys: list[str], severity=AssetCheckSeverity.ERROR) -> AssetCheckResult:
    return AssetCheckResult(
        passed=False,
        severity=severity,
        description=f"{rel}: missing or without the key(s) {keys}; expected numbers there",
    )


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _compare(
    rel: str, figures: dict[str, float | None], passed: Callable[..., bool], severity, description: str
) -> AssetCheckResult:
    """A check on two or more named figures (its metadata): fails naming the missing ones,
    else `passed(*values)` decides; `description` is formatted with the values."""
    if any(v is None for v in figures.values()):
        return _missing(rel, [k for k, v in figures.items() if v is None], severity)
    values = list(figures.values())
    return AssetCheckResult(
        passed=bool(passed(*values)), severity=severity, description=description.format(*values), metadata=figures
    )


def _at_least_baseline(
    by: dict[str, Stage], asset: str, baseline: str, key: str, name: str, description: str, text: str
) -> AssetChecksDefinition:
    """A WARN check: `asset`'s metric `key` is at least `baseline`'s (same split)."""

    @asset_check(asset=asset, name=name, additional_deps=[baseline], description=description)
    def _check(context: AssetCheckExecutionContext, dvc: DvcWorkspace) -> AssetCheckResult:
        m, rel = _metrics(dvc, by[asset])
        b, brel = _metrics(dvc, by[baseline])
        figures = {key: _num((m or {}).get(key)), f"baseline_{key}": _num((b or {}).get(key))}
        return _compare(f"{rel} / {brel}", figures, lambda model, base: model >= base, AssetCheckSeverity.WARN, text)

    return _check


def build_checks(stages: list[Stage]) -> list[AssetChecksDefinition]:
    by = {s.name: s for s in stages}
    checks: list[AssetChecksDefinition] = []

    if "pretrain" in by:

        @asset_check(
            asset="pretrain",
            name="val_loss_below_initial",
            description="pretraining reduced the validation loss: final val_loss is finite and below initial_val_loss",
        )
        def val_loss_below_initial(context: AssetCheckExecutionContext, dvc: DvcWorkspace) -> AssetCheckResult:
            m, rel = _metrics(dvc, by["pretrain"])
            figures = {k: _num((m or {}).get(k)) for k in ("val_loss", "initial_val_loss")}
            return _compare(
                rel,
                figures,
                lambda final, init: math.isfinite(final) and final < init,
                AssetCheckSeverity.ERROR,
                "val_loss {:.4f} vs initial {:.4f}",
            )

        checks.append(val_loss_below_initial)

    if "finetune_spam" in by:

        @asset_check(
            asset="finetune_spam",
            name="accuracy_above_floor",
            blocking=True,
            description="test accuracy of the spam classifier is at least params.yaml: export_onnx.min_test_accuracy "
            "(the floor the export stage enforces); blocking: on failure export_onnx and package do not run",
        )
        def accuracy_above_floor(context: AssetCheckExecutionContext, dvc: DvcWorkspace) -> AssetCheckResult:
            m, rel = _metrics(dvc, by["finetune_spam"])
            acc = _num((m or {}).get("test_accuracy"))
            if acc is None:
                return _missing(rel, ["test_accuracy"])
            floor = dvc.params().export_onnx.min_test_accuracy
            return AssetCheckResult(
                passed=acc >= floor,
                severity=AssetCheckSeverity.ERROR,
                description=f"test accuracy {acc:.4f} vs floor {floor} (params.yaml: export_onnx.min_test_accuracy)",
                metadata={"test_accuracy": acc, "floor": floor},
            )

        checks.append(accuracy_above_floor)

        if "baseline_spam" in by:
            checks.append(
                _at_least_baseline(
                    by,
                    "finetune_spam",
                    "baseline_spam",
                    "test_accuracy",
                    "accuracy_at_least_baseline",
                    "the GPT classifier is at least as accurate as the TF-IDF baseline on the same test split",
                    "test accuracy {:.4f} vs TF-IDF baseline {:.4f}",
                )
            )

    if "finetune_instruct" in by and "baseline_instruct" in by:
        checks.append(
            _at_least_baseline(
                by,
                "finetune_instruct",
                "baseline_instruct",
                "test_rouge_l",
                "rouge_l_at_least_baseline",
                "the instruction model's test ROUGE-L is at least the retrieval baseline's on the same split",
                "test ROUGE-L {:.4f} vs retrieval baseline {:.4f}",
            )
        )

    if "export_onnx" in by:

        @asset_check(
            asset="export_onnx",
            name="onnx_matches_pytorch",
            description="the ONNX model gives the PyTorch logits (within parity_atol) and the same labels on the test split",
        )
        def onnx_matches_pytorch(context: AssetCheckExecutionContext, dvc: DvcWorkspace) -> AssetCheckResult:
            m, rel = _metrics(dvc, by["export_onnx"])
            m = m or {}
            diff = _num(m.get("parity_max_abs_logit_diff", m.get("max_abs_logit_diff")))
            atol = _num(m.get("parity_atol"))
            mism = _num(m.get("parity_label_mismatches"))
            agree = _num(m.get("parity_label_agreement", m.get("label_agreement")))
            if diff is None or (mism is None and agree is None):
                return _missing(rel, ["parity_max_abs_logit_diff", "parity_label_mismatches"])
            labels_ok = (mism == 0) if mism is not None else (agree == 1.0)
            diff_ok = math.isfinite(diff) and (atol is None or diff <= atol)
            meta = {
                k: v
                for k, v in (
                    ("max_abs_logit_diff", diff),
                    ("parity_atol", atol),
                    ("label_mismatches", mism),
                    ("label_agreement", agree),
                )
                if v is not None
            }
            return AssetCheckResult(
                passed=labels_ok and diff_ok,
                severity=AssetCheckSeverity.ERROR,
                description=f"max |Δlogit| {diff:.3g} (atol {atol}), "
                f"label mismatches {mism if mism is not None else 1 - agree}",
                metadata=meta,
            )

        checks.append(onnx_matches_pytorch)
    return checks

"""bench/classifier_experiments.py: experiment names and the table built from `dvc exp show --json`."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ce():
    spec = importlib.util.spec_from_file_location("classifier_experiments", ROOT / "bench" / "classifier_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_lever_is_a_valid_distinct_experiment_name(ce):
    names = [ce.exp_name(lever) for lever in ce.LEVERS]
    assert len(set(names)) == len(names)
    for name in names:  # DVC experiment names are git ref components
        subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], check=True)


def test_every_override_names_a_real_params_key(ce):
    from gptpkg.config import load_params

    overrides = [o for os_ in ce.LEVERS.values() for o in os_]
    load_params(ROOT / "params.yaml", overrides)  # unknown or mistyped keys raise
    params = load_params(ROOT / "params.yaml")
    for o in overrides:
        section, key = o.split("=", 1)[0].split(".")
        assert key in params[section], o


def _exp(name: str, val: float, test: float, pre_s: float, ft_s: float) -> dict:
    m = lambda d: {"data": d}  # noqa: E731
    return {"revs": [{"rev": "abc", "name": name, "data": {"metrics": {
        "metrics/finetune_spam.json": m({"val_accuracy": val, "test_accuracy": test, "test_spam_f1": 0.9,
                                         "heldout_traffic_accuracy": 0.99, "heldout_traffic_spam_f1": 0.95}),
        "metrics/baseline_spam.json": m({"test_accuracy": 0.9667, "heldout_traffic_accuracy": 0.97,
                                         "heldout_traffic_spam_f1": 0.8}),
        "metrics/runtime/pretrain.json": m({"stage_wall_time_s": pre_s}),
        "metrics/runtime/finetune_spam.json": m({"stage_wall_time_s": ft_s}),
    }}}], "name": name}


def test_table_rows_come_from_exp_show_in_lever_order(ce):
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "c0ffee", "name": "main", "experiments": [
                _exp(ce.exp_name("seed=2"), 0.98, 0.97, 30.0, 30.0),
                _exp("someone-elses-experiment", 0.5, 0.5, 1.0, 1.0),
                _exp(ce.exp_name("defaults"), 0.9933, 0.9667, 30.0, 60.0)]}]
    rows = ce.rows_from_exp_show(show)
    assert [r["lever"] for r in rows] == ["defaults", "seed=2"]
    assert rows[0]["minutes"] == pytest.approx(1.5)
    table = ce.markdown(rows)
    assert "| defaults | 99.33% | 96.67% | 0.9000 | 99.00% | 0.9500 | 96.67% | 97.00% | 0.8000 | 1.5 |" in table

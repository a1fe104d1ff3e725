"""dvc.yaml tracks, per stage, every key of that stage's params.yaml section, so a
change to any hyperparameter reruns the stage (and only the stages that read it)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_section_key_is_a_tracked_param():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if name not in params:
            continue
        tracked = {p for p in stage.get("params", []) if isinstance(p, str)}
        expected = {f"{name}.{key}" for key in params[name]}
        assert expected <= tracked, f"{name}: params.yaml keys not in dvc.yaml params: {sorted(expected - tracked)}"
        foreign = {p for p in tracked if p.split(".")[0] == name} - expected
        assert not foreign, f"{name}: dvc.yaml tracks keys params.yaml lacks: {sorted(foreign)}"

"""dvc.yaml and the stage registry agree: the committed file is the one `gptpkg dvc-yaml`
generates, with one DVC stage per registered stage, run by `gptpkg <stage>`, tracking every
key of its params.yaml section (so a change to any hyperparameter reruns the stage, and
only the stages that read it)."""

from pathlib import Path

import yaml

from gptpkg.config import Params, load_params
from gptpkg.pipeline import STAGES, planned

ROOT = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_the_generated_one():
    from gptpkg.dvc_yaml import render

    assert (ROOT / "dvc.yaml").read_text() == render(), "dvc.yaml is out of date: run `gptpkg dvc-yaml`"


def test_dvc_yaml_check_fails_on_a_stale_file(tmp_path):
    from gptpkg.cli import main

    stale = tmp_path / "dvc.yaml"
    stale.write_text((ROOT / "dvc.yaml").read_text().replace("gptpkg/model.py", "gptpkg/modl.py"))
    params = ["--params", str(ROOT / "params.yaml")]
    assert main(["dvc-yaml", "--check", "--output", str(stale), *params]) == 1
    assert "modl.py" in stale.read_text()  # --check writes nothing
    assert main(["dvc-yaml", "--output", str(stale), *params]) == 0
    assert main(["dvc-yaml", "--check", "--output", str(stale), *params]) == 0


def test_code_deps_follow_every_import(tmp_path):
    """Static import graph: a function-level import counts (hf_weights with init: openai),
    and a stage never depends on another stage's module."""
    from gptpkg.dvc_yaml import code_deps

    spam = code_deps(STAGES["finetune_spam"])
    assert {"gptpkg/hf_weights.py", "gptpkg/stages/finetune_spam.py", "gptpkg/stages/__init__.py"} <= set(spam)
    for name, stage in STAGES.items():
        own = {f"gptpkg/stages/{name}.py"}
        assert {
            d for d in code_deps(stage) if d.startswith("gptpkg/stages/") and d != "gptpkg/stages/__init__.py"
        } == own


def test_dvc_stages_are_the_registry():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(planned(load_params(ROOT / "params.yaml")))
    assert set(STAGES) - set(stages) == {"weights"}  # the default fine-tunings start from our pretraining
    sections = set(Params.model_fields)
    for name, stage in stages.items():
        assert stage["cmd"].endswith(f"gptpkg {name}"), stage["cmd"]  # progress bars: tqdm decides
        assert STAGES[name].params_section in sections
        assert callable(STAGES[name].function())
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        if STAGES[name].checkpoint:
            assert f"${{paths.{STAGES[name].checkpoint}}}" in outs


def test_every_stage_section_key_is_a_tracked_param():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        section = STAGES[name].params_section
        tracked = {p for p in stage.get("params", []) if isinstance(p, str)}
        expected = {f"{section}.{key}" for key in params[section]}
        if STAGES[name].params is not None:  # keys that never change the outputs (fetch: where files come from)
            expected = {f"{section}.{k}" for k in STAGES[name].params}
        assert expected <= tracked, f"{name}: params.yaml keys not in dvc.yaml params: {sorted(expected - tracked)}"
        foreign = {p for p in tracked if p.split(".")[0] == section} - expected
        assert not foreign, f"{name}: dvc.yaml tracks keys params.yaml lacks: {sorted(foreign)}"


def test_stages_without_the_model_do_not_depend_on_it():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("fetch", "prepare", "baseline_spam", "package"):
        deps = set(stages[name]["deps"])
        assert not deps & {"gptpkg/model.py", "gptpkg/checkpoint.py", "gptpkg/train.py"}, name


def test_openai_init_drops_pretraining_from_dvc_and_dagster(tmp_path):
    """With init: openai for both fine-tunings, `gptpkg profile` rewrites dvc.yaml: a
    weights stage and no pretrain, for `dvc repro` (DVC's own graph of a real repository) and for
    the Dagster job; back to init: pretrained, the default pipeline again."""
    import shutil
    import subprocess
    import sys

    from gptpkg.cli import main

    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copytree(ROOT / "gptpkg", tmp_path / "gptpkg", ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["profile", "openai-gpt2", "--params", str(tmp_path / "params.yaml")]) == 0
    assert main(["dvc-yaml", "--check", "--output", str(tmp_path / "dvc.yaml")]) == 0
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "pretrain" not in stages and "weights" in stages
    for name in ("finetune_spam", "finetune_instruct"):
        assert stages[name]["deps"][0] == "${paths.openai_weights}"
        assert "${paths.pretrained}" not in stages[name]["deps"]

    dvc = [str(Path(sys.executable).parent / "dvc")]
    for args in (["git", "init", "-q"], [*dvc, "init", "-q"]):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    dag = subprocess.run([*dvc, "dag", "--dot"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert '"weights" -> "finetune_spam"' in dag and '"weights" -> "finetune_instruct"' in dag
    assert '"pretrain"' not in dag

    from workflows.definitions import build_definitions

    job = build_definitions(tmp_path).resolve_job_def("full_pipeline")
    assets = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert "pretrain" not in assets and {"weights", "finetune_spam"} <= assets

    assert main(["profile", "--params", str(tmp_path / "params.yaml"), "--set", "finetune_spam.init=pretrained"]) == 0
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert {"pretrain", "weights"} <= set(stages)  # the classifier pretrained, the instruction model OpenAI's
    assert stages["finetune_spam"]["deps"][0] == "${paths.pretrained}"

"""Dagster over the DVC pipeline: definitions derived from dvc.yaml, a real materialization
of the whole graph (tiny profile) in a temp DVC repository, checks, failures, the
dvc.lock sensor, and `dagster definitions validate`."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptpkg.loggers import wandb_from_env  # noqa: F401  (the resource's env vars are read there)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["params.yaml", "profiles", "dvc.yaml", ".dvcignore", ".dvc/config", "gptpkg", ".gitignore"]


def make_project(dest: Path) -> Path:
    """A fresh git + DVC repository holding this project's pipeline files."""
    for name in PROJECT_FILES:
        src = ROOT / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=dest, check=True)
    return dest


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture()
def stage_env(monkeypatch, tmp_path):
    """Stages run the project copy's gptpkg (the code DVC hashes)."""
    def use(root: Path):
        monkeypatch.setenv("PYTHONPATH", str(root))
    return use


def stage_names(dvc_yaml: Path) -> list[str]:
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


# ---------------------------------------------------------------- definitions

def test_assets_mirror_dvc_yaml():
    from dagster import AssetKey

    from workflows import build_definitions
    from workflows.dvc_project import GROUPS

    defs = build_definitions(ROOT)
    graph = defs.resolve_asset_graph()
    names = stage_names(ROOT / "dvc.yaml")
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == set(names)
    expected_parents = {"fetch": set(), "prepare": {"fetch"}, "pretrain": {"prepare"},
                        "finetune_spam": {"pretrain", "prepare"}, "baseline_spam": {"prepare"},
                        "finetune_instruct": {"pretrain", "prepare"}}
    for name in names:
        node = graph.get(AssetKey(name))
        assert node.group_name == GROUPS.get(name, "pipeline")
        if name in expected_parents:
            assert {p.to_user_string() for p in node.parent_keys} == expected_parents[name], name
    checks = {k.name for k in graph.asset_check_keys}
    assert {"val_loss_below_initial", "accuracy_above_floor", "accuracy_at_least_baseline"} <= checks
    assert ("onnx_matches_pytorch" in checks) == ("export_onnx" in names)
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"full_pipeline", "classifier_only"} <= jobs


def test_a_new_dvc_stage_becomes_an_asset(tmp_path):
    """export_onnx / package added to dvc.yaml (as the serving branch does) appear as assets in
    the serving group, with the parity check and in the classifier_only job; an unknown stage
    lands in the default group."""
    from dagster import AssetKey

    from workflows import build_definitions

    root = make_project(tmp_path)
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    doc["stages"]["export_onnx"] = {"cmd": "gptpkg export_onnx", "deps": ["${paths.spam_classifier}"],
                                    "outs": ["${paths.onnx}"],
                                    "metrics": [{"${paths.metrics}/export_onnx.json": {"cache": False}}]}
    doc["stages"]["package"] = {"cmd": "gptpkg package", "deps": ["${paths.onnx}"]}
    doc["stages"]["report"] = {"cmd": "echo", "deps": ["${paths.metrics}/export_onnx.json"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    defs = build_definitions(root)
    graph = defs.resolve_asset_graph()
    assert {p.to_user_string() for p in graph.get(AssetKey("export_onnx")).parent_keys} == {"finetune_spam"}
    assert {p.to_user_string() for p in graph.get(AssetKey("package")).parent_keys} == {"export_onnx"}
    assert {p.to_user_string() for p in graph.get(AssetKey("report")).parent_keys} == {"export_onnx"}
    assert graph.get(AssetKey("package")).group_name == "serving"
    assert graph.get(AssetKey("report")).group_name == "pipeline"
    assert "onnx_matches_pytorch" in {k.name for k in graph.asset_check_keys}
    job = defs.resolve_job_def("classifier_only")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"finetune_spam", "export_onnx", "package"}


def test_onnx_parity_check_reads_export_metrics(tmp_path):
    """The parity check against the export stage's metrics keys: passes on agreement, fails on a
    label mismatch, fails clearly when the keys are missing."""
    import json

    from dagster import build_asset_check_context  # noqa: F401

    from workflows.checks import build_checks
    from workflows.dvc_project import Stage
    from workflows.resources import DvcWorkspace

    stage = Stage("export_onnx", "gptpkg export_onnx", ("finetune_spam",), (), ("models/onnx",),
                  ("metrics/export_onnx.json",), (), "x", "serving")
    (check,) = build_checks([stage])
    (tmp_path / "metrics").mkdir()
    m = tmp_path / "metrics" / "export_onnx.json"
    res = DvcWorkspace(root=str(tmp_path))

    def run():
        return check.node_def.compute_fn.decorated_fn(None, res)

    m.write_text(json.dumps({"parity_max_abs_logit_diff": 2e-6, "parity_label_mismatches": 0, "parity_atol": 1e-4}))
    assert run().passed
    m.write_text(json.dumps({"parity_max_abs_logit_diff": 2e-6, "parity_label_mismatches": 3, "parity_atol": 1e-4}))
    assert not run().passed
    m.write_text(json.dumps({"export_s": 1.0}))
    r = run()
    assert not r.passed and "parity_max_abs_logit_diff" in r.description


@pytest.mark.integration
def test_definitions_validate_from_the_root():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([str(BIN / "dagster"), "definitions", "validate"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Validation successful for code location gptpkg" in p.stdout + p.stderr


# ---------------------------------------------------------------- real runs

def _resources(root: Path, **dvc_over):
    from workflows.resources import DvcWorkspace, QualityGates, WandbResource

    return {"dvc": DvcWorkspace(root=str(root), **dvc_over), "wandb": WandbResource(mode="offline"),
            "gates": QualityGates(spam_accuracy_floor=0.0)}


def _all(defs):
    return list(defs.assets) + list(defs.asset_checks)


@pytest.mark.integration
def test_materialize_all_tiny_then_dvc_agrees(tmp_path, stage_env):
    from dagster import AssetKey, DagsterInstance, materialize
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus

    from workflows import build_definitions
    from workflows.dvc_project import outs_version, read_lock
    from workflows.sensors import shell_run_events

    root = make_project(tmp_path / "proj")
    stage_env(root)
    defs = build_definitions(root)
    names = stage_names(root / "dvc.yaml")
    instance = DagsterInstance.ephemeral()

    result = materialize(_all(defs), instance=instance, resources=_resources(root, profile="tiny"))
    assert result.success
    assert {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()
            and [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]} == set(names)

    # DVC is the record: nothing to do, and the data versions are dvc.lock's output hashes
    assert "Data and pipelines are up to date" in dvc(root, "status")
    lock = read_lock(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["pretrain"]["model"] == "tiny"  # the run config's profile, written for DVC to record
    for name in names:
        ev = instance.get_latest_materialization_event(AssetKey(name))
        assert ev.asset_materialization.tags["dagster/data_version"] == outs_version(lock[name]), name

    md = {e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
          for e in result.get_asset_materialization_events()}
    assert md["pretrain"]["val_loss"].value == pytest.approx(
        __import__("json").loads((root / "metrics/pretrain.json").read_text())["val_loss"])
    for key in ("initial_val_loss", "tokens_per_s", "wall_time_s", "wandb_run", "outputs", "plot_pretrain_loss"):
        assert key in md["pretrain"], key
    assert md["pretrain"]["plot_pretrain_loss"].value.startswith("![pretrain_loss](data:image/png;base64,")
    assert Path(md["pretrain"]["wandb_run"].value).name.startswith("offline-run-")
    for key in ("test_accuracy", "test_confusion", "plot_finetune_spam_confusion", "plot_finetune_spam_loss"):
        assert key in md["finetune_spam"], key
    assert "test_accuracy" in md["baseline_spam"]
    assert "models/spam_classifier" in md["finetune_spam"]["outputs"].value

    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) >= {"val_loss_below_initial", "accuracy_above_floor", "accuracy_at_least_baseline"}
    m = __import__("json").loads((root / "metrics/pretrain.json").read_text())
    assert checks["val_loss_below_initial"].passed == (m["val_loss"] < m["initial_val_loss"])
    assert checks["accuracy_above_floor"].passed  # floor 0.0
    spam = __import__("json").loads((root / "metrics/finetune_spam.json").read_text())
    base = __import__("json").loads((root / "metrics/baseline_spam.json").read_text())
    assert checks["accuracy_at_least_baseline"].passed == (spam["test_accuracy"] >= base["test_accuracy"])
    assert checks["accuracy_at_least_baseline"].severity.value == "WARN"

    # unchanged: the classifier re-materializes in seconds (DVC skips it); a floor above 1 fails loudly
    from workflows.resources import QualityGates

    t0 = time.perf_counter()
    sel = [a for a in _all(defs) if AssetKey("finetune_spam") in a.keys or
           any(k.asset_key == AssetKey("finetune_spam") for k in a.check_keys)]
    again = materialize(sel, instance=instance, selection=[AssetKey("finetune_spam")],
                        resources={**_resources(root, profile="tiny"), "gates": QualityGates(spam_accuracy_floor=1.01)})
    took = time.perf_counter() - t0
    assert again.success
    (ev,) = again.get_asset_materialization_events()
    assert ev.event_specific_data.materialization.metadata["dvc_skipped"].value is True
    floor = {e.asset_check_key.name: e for e in again.get_asset_check_evaluations()}["accuracy_above_floor"]
    assert not floor.passed and floor.severity.value == "ERROR"
    print(f"re-materialize unchanged finetune_spam: {took:.1f} s")
    assert took < 60

    # nothing to report while dvc.lock matches what Dagster recorded
    res = _resources(root)["dvc"]
    assert shell_run_events(instance, res) == []

    # `dvc repro` from a shell after a params change: DVC reruns baseline_spam; the sensor reports it
    # with DVC's hash and provenance, so Dagster shows it fresh, as `dvc status` does
    text = (root / "params.yaml").read_text().replace("C: 10.0", "C: 1.0")
    (root / "params.yaml").write_text(text)
    dvc(root, "repro")
    events = shell_run_events(instance, res)
    assert [e.asset_key.to_user_string() for e in events] == ["baseline_spam"]
    for e in events:
        instance.report_runless_asset_event(e)
    assert "Data and pipelines are up to date" in dvc(root, "status")
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph())
    assert {n: resolver.get_status(AssetKey(n)) for n in names} == {n: StaleStatus.FRESH for n in names}

    # a stage changed by hand but not reproduced: DVC and Dagster both call its dependents stale
    text = (root / "params.yaml").read_text().replace("seed: 123                 # spam", "seed: 7                 # spam")
    (root / "params.yaml").write_text(text)
    dvc(root, "repro", "--single-item", "prepare")
    for e in shell_run_events(instance, res):
        instance.report_runless_asset_event(e)
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph())
    stale = {n for n in names if resolver.get_status(AssetKey(n)) == StaleStatus.STALE}
    dvc_stale = set(yaml.safe_load(dvc(root, "status", "--json")) or {})
    assert stale == dvc_stale and "pretrain" in stale


@pytest.mark.integration
def test_failing_stage_fails_its_asset_with_the_stage_error(tmp_path, stage_env, shared_data, monkeypatch):
    """A corrupt raw file in the data mirror: fetch fails with gptpkg's own message, nothing
    downstream is materialized, and the good files are untouched."""
    from dagster import materialize

    from workflows import build_definitions

    mirror = tmp_path / "mirror"
    shutil.copytree(shared_data, mirror)
    (mirror / "SMSSpamCollection").write_bytes(b"not the spam collection\n")
    monkeypatch.setenv("GPTPKG_DATA_MIRROR", str(mirror))
    root = make_project(tmp_path / "proj")
    stage_env(root)
    defs = build_definitions(root)
    result = materialize(_all(defs), resources=_resources(root, profile="tiny"), raise_on_error=False)
    assert not result.success
    assert result.get_asset_materialization_events() == []
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "fetch"
    text = str(failure.event_specific_data.error)
    assert "gptpkg fetch: error:" in text and "SMSSpamCollection" in text and "expected" in text
    assert "failed to reproduce 'fetch'" in text
    assert not (root / "dvc.lock").exists()

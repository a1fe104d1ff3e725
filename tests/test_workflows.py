"""Dagster over the DVC pipeline: definitions derived from dvc.yaml, a real materialization
of the whole graph (tiny profile) in a temp DVC repository, checks, failures, the
dvc.lock sensor, `dagster definitions validate`, and the UI in headless Chromium (the asset
graph, and the asset pages of that materialization)."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "params.yaml",
    "profiles",
    "dvc.yaml",
    ".dvcignore",
    ".dvc/config",
    "gptpkg",
    ".gitignore",
    "data/corpus",
]
UI_FILES = ["pyproject.toml", "workflows"]  # what `dagster dev` / `dagster-webserver` load the definitions from


def make_project(dest: Path, *extra: str) -> Path:
    """A fresh git + DVC repository holding this project's pipeline files (and `extra` ones)."""
    for name in (*PROJECT_FILES, *extra):
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
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, check=True, capture_output=True, text=True
    ).stdout


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

    defs = build_definitions(ROOT)
    graph = defs.resolve_asset_graph()
    names = stage_names(ROOT / "dvc.yaml")
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == set(names)
    expected_parents = {
        "fetch": set(),
        "prepare": {"fetch"},
        "pretrain": {"prepare"},
        "finetune_spam": {"pretrain", "prepare"},
        "baseline_spam": {"prepare"},
        "finetune_instruct": {"pretrain", "prepare"},
        "baseline_instruct": {"prepare"},
    }
    # the groups of the stage registry (gptpkg.pipeline.STAGES)
    groups = {
        "fetch": "data",
        "prepare": "data",
        "pretrain": "pretraining",
        "finetune_spam": "classifier",
        "baseline_spam": "classifier",
        "finetune_instruct": "instruction",
        "baseline_instruct": "instruction",
        "export_onnx": "serving",
        "package": "serving",
    }
    for name in names:
        node = graph.get(AssetKey(name))
        assert node.group_name == groups[name], name
        if name in expected_parents:
            assert {p.to_user_string() for p in node.parent_keys} == expected_parents[name], name
    checks = {k.name for k in graph.asset_check_keys}
    assert {
        "val_loss_below_initial",
        "accuracy_above_floor",
        "accuracy_at_least_baseline",
        "rouge_l_at_least_baseline",
    } <= checks
    assert ("onnx_matches_pytorch" in checks) == ("export_onnx" in names)
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"full_pipeline", "classifier_only"} <= jobs
    job = defs.resolve_job_def("classifier_only")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "finetune_spam",
        "export_onnx",
        "package",
    } & set(names)


def test_a_new_registry_stage_becomes_an_asset(tmp_path, monkeypatch):
    """A stage added to the registry (which dvc.yaml is generated from) appears in dvc.yaml
    and as an asset of its group, downstream of the stage whose outputs it reads; the
    classifier_only job takes what follows the classifier."""
    from dagster import AssetKey

    from gptpkg.dvc_yaml import render
    from gptpkg.pipeline import STAGES, Out, Stage
    from workflows import build_definitions

    root = make_project(tmp_path)
    report = Stage(
        "report",
        "summarize the export",
        "reports",
        deps=("{metrics}/export_onnx.json",),
        outs=(Out("{metrics}/report.md", cache=False),),
        section="package",
    )
    monkeypatch.setitem(STAGES, "report", report)
    doc = yaml.safe_load(render())
    assert doc["stages"]["report"]["deps"][0] == "${paths.metrics}/export_onnx.json"
    assert "gptpkg/stages/report.py" not in doc["stages"]["report"]["deps"]  # no module yet: nothing to hash
    defs = build_definitions(root)
    graph = defs.resolve_asset_graph()
    assert {p.to_user_string() for p in graph.get(AssetKey("export_onnx")).parent_keys} == {"finetune_spam", "prepare"}
    assert {p.to_user_string() for p in graph.get(AssetKey("package")).parent_keys} == {"export_onnx"}
    assert {p.to_user_string() for p in graph.get(AssetKey("report")).parent_keys} == {"export_onnx"}
    assert graph.get(AssetKey("package")).group_name == "serving"
    assert graph.get(AssetKey("report")).group_name == "reports"
    assert "onnx_matches_pytorch" in {k.name for k in graph.asset_check_keys}
    job = defs.resolve_job_def("classifier_only")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "finetune_spam",
        "export_onnx",
        "package",
        "report",
    }


def test_onnx_parity_check_reads_export_metrics(tmp_path):
    """The parity check against the export stage's metrics keys: passes on agreement, fails on a
    label mismatch, fails clearly when the keys are missing."""
    import json

    from dagster import build_asset_check_context

    from workflows.checks import build_checks
    from workflows.dvc_project import Stage
    from workflows.resources import DvcWorkspace

    stage = Stage(
        "export_onnx",
        "gptpkg export_onnx",
        ("finetune_spam",),
        (),
        ("models/onnx",),
        ("metrics/export_onnx.json",),
        (),
        "x",
        "serving",
    )
    (check,) = build_checks([stage])
    (tmp_path / "metrics").mkdir()
    m = tmp_path / "metrics" / "export_onnx.json"
    res = DvcWorkspace(root=str(tmp_path))

    def run():
        return check(build_asset_check_context(), dvc=res)

    m.write_text(json.dumps({"parity_max_abs_logit_diff": 2e-6, "parity_label_mismatches": 0, "parity_atol": 1e-4}))
    assert run().passed
    m.write_text(json.dumps({"parity_max_abs_logit_diff": 2e-6, "parity_label_mismatches": 3, "parity_atol": 1e-4}))
    assert not run().passed
    m.write_text(json.dumps({"export_s": 1.0}))
    r = run()
    assert not r.passed and "parity_max_abs_logit_diff" in r.description


def test_wandb_resource_reaches_the_stage_logger(monkeypatch):
    """The resource's settings are what gptpkg's W&B logger reads (over params.yaml: wandb)."""
    from gptpkg.loggers import wandb_from_env
    from workflows.resources import WandbResource

    assert WandbResource().env() == {"WANDB_MODE": "offline", "WANDB_PROJECT": "gptpkg"}
    for k, v in WandbResource(mode="online", project="p", entity="team").env().items():
        monkeypatch.setenv(k, v)
    assert wandb_from_env({"mode": "offline", "project": "gptpkg", "entity": ""}) == {
        "mode": "online",
        "project": "p",
        "entity": "team",
    }
    assert WandbResource(mode="online").run_link("team/p/abc123").value == "https://wandb.ai/team/p/runs/abc123"


def test_run_config_params_are_written_for_the_block_only(tmp_path):
    """Profile + overrides are written into params.yaml by the same code as `gptpkg profile`
    (comments kept, only changed keys) while the block runs, and the file gets its own bytes
    back after it, also when the block fails; a bad key is a clear error that writes nothing."""
    from dagster import Failure

    from workflows.resources import DvcWorkspace

    for name in ("params.yaml", "profiles"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, tmp_path / name)
    before = (tmp_path / "params.yaml").read_bytes()
    with DvcWorkspace(root=str(tmp_path)).run_params() as changed:
        assert changed == [] and (tmp_path / "params.yaml").read_bytes() == before
    res = DvcWorkspace(root=str(tmp_path), profile="tiny", set=["finetune_spam.lr=0.001"])
    assert res.params().finetune_spam.lr == 0.001 and res.params().pretrain.model == "tiny"
    with pytest.raises(RuntimeError, match="the stage broke"), res.run_params() as changed:
        assert "pretrain.model" in changed and "finetune_spam.lr" in changed and "pretrain.lr" not in changed
        during = yaml.safe_load((tmp_path / "params.yaml").read_text())
        assert during["pretrain"]["model"] == "tiny" and during["finetune_spam"]["lr"] == 0.001
        assert "# every file and folder the pipeline reads or writes" in (tmp_path / "params.yaml").read_text()
        raise RuntimeError("the stage broke")
    assert (tmp_path / "params.yaml").read_bytes() == before
    with (
        pytest.raises(Failure, match="finetune_spam.no_such_key"),
        DvcWorkspace(root=str(tmp_path), set=["finetune_spam.no_such_key=1"]).run_params(),
    ):
        pass
    assert (tmp_path / "params.yaml").read_bytes() == before


RUN_IN_POOL = """
import pathlib, sys, time
from dagster import DagsterInstance, asset, materialize
from workflows.assets import POOL

@asset(name=sys.argv[2], pool=POOL)
def step():
    t0 = time.time()
    pathlib.Path(sys.argv[3]).touch()
    time.sleep(2)
    print("SPAN", t0, time.time())

assert materialize([step], instance=DagsterInstance.from_config(sys.argv[1])).success
"""


def test_the_pool_runs_one_stage_at_a_time(tmp_path):
    """The instance settings in dagster.yaml limit the stages' pool to one step at a time
    across runs: a second run (another process, as the daemon launches runs) started while
    the first one's pool step runs waits for it to end.

    The second run starts once the first holds the slot: Dagster's SQLite storage can hand
    one free slot to two claims made in the same instant (its claim reads, then writes
    without a row lock), so two runs whose steps start together can overlap."""
    from dagster import DagsterInstance

    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    assert DagsterInstance.from_config(str(tmp_path)).get_concurrency_config().pool_config.default_pool_limit == 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DAGSTER_HOME": str(tmp_path)}

    def start(name: str) -> subprocess.Popen:
        cmd = [sys.executable, "-c", RUN_IN_POOL, str(tmp_path), name, str(tmp_path / f"{name}.started")]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    first = start("a")
    deadline = time.time() + 240
    while not (tmp_path / "a.started").exists():
        assert first.poll() is None and time.time() < deadline, "the first run's step never started"
        time.sleep(0.05)
    spans = []
    for p in (first, start("b")):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        (line,) = [ln for ln in out.splitlines() if ln.startswith("SPAN")]
        spans.append(tuple(map(float, line.split()[1:])))
    (_, first_end), (second_start, _) = spans
    assert first_end <= second_start, spans


@pytest.mark.integration
def test_definitions_validate_from_the_root():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Validation successful for code location gptpkg" in p.stdout + p.stderr


# ---------------------------------------------------------------- real runs


def _resources(root: Path, **dvc_over):
    from dagster import PipesSubprocessClient

    from workflows.resources import DvcWorkspace, WandbResource

    return {
        "dvc": DvcWorkspace(root=str(root), **dvc_over),
        "wandb": WandbResource(mode="offline"),
        "pipes_subprocess_client": PipesSubprocessClient(),
    }


def _all(defs):
    return list(defs.assets) + list(defs.asset_checks)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole pipeline on the tiny profile, materialized once by Dagster in a temp DVC
    project that a webserver can load (workflows/ and pyproject.toml beside dvc.yaml), on a
    persistent instance in a temp DAGSTER_HOME. Shared by the DVC-agreement test and the
    asset-page test (which reads the latest materializations, whatever ran before it)."""
    from dagster import DagsterInstance, materialize

    from workflows import build_definitions

    base = tmp_path_factory.mktemp("tiny-run")
    root = make_project(base / "proj", *UI_FILES)
    home = base / "dagster_home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        instance = DagsterInstance.get()  # the instance `dagster dev` / `dagster-webserver` open there
    from gptpkg.cli import main as gptpkg_main

    # the workspace's params are the tiny profile (`gptpkg profile tiny`, committed)
    assert gptpkg_main(["profile", "tiny", "--params", str(root / "params.yaml")]) == 0
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny"], cwd=root, check=True)
    with instance:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(root))  # stages run the project copy's gptpkg (the code DVC hashes)
            defs = build_definitions(root)
            result = materialize(_all(defs), instance=instance, resources=_resources(root))
        yield SimpleNamespace(root=root, home=home, instance=instance, defs=defs, result=result)


@pytest.mark.integration
def test_materialize_all_tiny_then_dvc_agrees(tiny_run, stage_env):
    from dagster import AssetKey, build_sensor_context, materialize

    from gptpkg.cli import main as gptpkg_main
    from workflows.dvc_project import outs_version, read_lock
    from workflows.sensors import dvc_lock_sensor, shell_run_stages

    root, defs, instance, result = tiny_run.root, tiny_run.defs, tiny_run.instance, tiny_run.result
    stage_env(root)
    names = stage_names(root / "dvc.yaml")
    assert result.success
    assert {
        m.asset_key.to_user_string()
        for m in result.get_asset_materialization_events()
        and [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    } == set(names)

    # DVC is the record: nothing to do, and the data versions are dvc.lock's output hashes
    assert "Data and pipelines are up to date" in dvc(root, "status")
    lock = read_lock(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["pretrain"]["model"] == "tiny"
    for name in names:
        ev = instance.get_latest_materialization_event(AssetKey(name))
        assert ev.asset_materialization.tags["dagster/data_version"] == outs_version(lock[name]), name

    md = {
        e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert md["pretrain"]["val_loss"].value == pytest.approx(
        json.loads((root / "metrics/pretrain.json").read_text())["val_loss"]
    )
    for key in ("initial_val_loss", "tokens_per_s", "wall_time_s", "wandb_run", "outputs", "plot_pretrain_loss"):
        assert key in md["pretrain"], key
    assert md["pretrain"]["plot_pretrain_loss"].value.startswith("![pretrain_loss](data:image/png;base64,")
    assert Path(md["pretrain"]["wandb_run"].value).name.startswith("offline-run-")
    # the stage's run record (wall time, W&B run) came through Pipes; every stage reported
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert not [m for m in logs if "did not receive any messages" in m], logs
    assert any(m.startswith("gptpkg pretrain: done in") for m in logs)
    for key in ("test_accuracy", "test_confusion", "plot_finetune_spam_confusion", "plot_finetune_spam_loss"):
        assert key in md["finetune_spam"], key
    assert "test_accuracy" in md["baseline_spam"]
    assert "models/spam_classifier" in md["finetune_spam"]["outputs"].value

    checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) >= {"val_loss_below_initial", "accuracy_above_floor", "accuracy_at_least_baseline"}
    m = json.loads((root / "metrics/pretrain.json").read_text())
    assert checks["val_loss_below_initial"].passed == (m["val_loss"] < m["initial_val_loss"])
    assert checks["accuracy_above_floor"].passed  # floor 0.0
    spam = json.loads((root / "metrics/finetune_spam.json").read_text())
    base = json.loads((root / "metrics/baseline_spam.json").read_text())
    assert checks["accuracy_at_least_baseline"].passed == (spam["test_accuracy"] >= base["test_accuracy"])
    assert checks["accuracy_at_least_baseline"].severity.value == "WARN"
    instruct = __import__("json").loads((root / "metrics/finetune_instruct.json").read_text())
    retrieval = __import__("json").loads((root / "metrics/baseline_instruct.json").read_text())
    rouge = checks["rouge_l_at_least_baseline"]
    assert rouge.passed == (instruct["test_rouge_l"] >= retrieval["test_rouge_l"]) and rouge.severity.value == "WARN"
    sample = md["finetune_instruct"]["test_sample"].value.splitlines()
    assert len(sample) == 12 and sample[0].startswith("| instruction | reference | model |")
    assert not any(line.endswith("| — | — |") for line in sample)  # every item has its baseline answer

    # unchanged: the classifier re-materializes in seconds (DVC skips it). A floor above its
    # accuracy fails the blocking check, so export_onnx and package never run
    assert spam["test_accuracy"] < 1.0
    onnx_before = (root / "models/onnx/model.onnx").read_bytes()
    params_before = (root / "params.yaml").read_bytes()
    t0 = time.perf_counter()
    serving = [AssetKey(n) for n in ("finetune_spam", "export_onnx", "package")]
    again = materialize(
        [a for a in _all(defs) if set(a.keys) & set(serving) or {k.asset_key for k in a.check_keys} & set(serving)],
        instance=instance,
        selection=serving,
        resources=_resources(root, profile="tiny", set=["export_onnx.min_test_accuracy=1.0"]),
        raise_on_error=False,
    )
    took = time.perf_counter() - t0
    assert not again.success  # the gate fails the run
    # the run config held for the run only: params.yaml is the committed file again
    assert (root / "params.yaml").read_bytes() == params_before
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=root, capture_output=True).stdout == b""
    (ev,) = again.get_asset_materialization_events()
    mat = ev.event_specific_data.materialization
    assert mat.asset_key == AssetKey("finetune_spam") and mat.metadata["dvc_skipped"].value is True
    floor = {e.asset_check_key.name: e for e in again.get_asset_check_evaluations()}["accuracy_above_floor"]
    assert not floor.passed and floor.severity.value == "ERROR" and floor.metadata["floor"].value == 1.0
    (failed,) = [e.step_key for e in again.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed == "finetune_spam_accuracy_above_floor"
    started = {e.step_key for e in again.all_events if e.event_type_value == "STEP_START"}
    assert not {"export_onnx", "package"} & started, started
    print(f"re-materialize unchanged finetune_spam: {took:.1f} s")
    assert took < 60
    # the same floor in params.yaml stops `dvc repro` from a shell, with the stage's own message
    assert (
        gptpkg_main(["profile", "--params", str(root / "params.yaml"), "--set", "export_onnx.min_test_accuracy=1"]) == 0
    )
    p = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "package"],
        cwd=root,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0
    assert "below params.export_onnx.min_test_accuracy 1.0; not exported" in p.stdout + p.stderr
    dvc(root, "checkout", "export_onnx")  # DVC removes a stage's outputs before it runs it
    assert (root / "models/onnx/model.onnx").read_bytes() == onnx_before
    subprocess.run(["git", "checkout", "params.yaml"], cwd=root, check=True)
    dvc(root, "repro")  # export_onnx again: the failed run removed its (uncached) metrics files
    assert "Data and pipelines are up to date" in dvc(root, "status")

    # the same export again, so the same dvc.lock entry: nothing for the sensor to report
    res = _resources(root)["dvc"]
    assert shell_run_stages(instance, res) == {}

    # `dvc repro` from a shell after a params change: DVC reruns baseline_spam; the sensor asks
    # for a run of it, which DVC skips and which records DVC's hash as its data version
    text = (root / "params.yaml").read_text().replace("C: 10.0", "C: 1.0")
    (root / "params.yaml").write_text(text)
    dvc(root, "repro")
    # the sensor as the daemon evaluates it, in the code location against this instance:
    # its run request must fall inside its target
    env = {**os.environ, "DAGSTER_HOME": str(tiny_run.home), "GPTPKG_DVC_ROOT": str(root), "PYTHONPATH": str(root)}
    p = subprocess.run(
        [str(BIN / "dagster"), "sensor", "preview", "dvc_lock_sensor", "-m", "workflows"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "Sensor returning run requests for 1 run(s)" in p.stdout, p.stdout + p.stderr
    tick = dvc_lock_sensor(build_sensor_context(instance=instance, resources={"dvc": res}))
    (request,) = tick.run_requests
    assert request.asset_selection == [AssetKey("baseline_spam")]
    synced = materialize(_all(defs), instance=instance, selection=request.asset_selection, resources=_resources(root))
    (ev,) = synced.get_asset_materialization_events()
    assert ev.event_specific_data.materialization.metadata["dvc_skipped"].value is True
    lock = read_lock(root)
    ev = instance.get_latest_materialization_event(AssetKey("baseline_spam"))
    assert ev.asset_materialization.tags["dagster/data_version"] == outs_version(lock["baseline_spam"])
    assert shell_run_stages(instance, res) == {}
    assert "Data and pipelines are up to date" in dvc(root, "status")

    # a stage reproduced alone: the sensor syncs it only; DVC reruns its dependents, and
    # Dagster sees a new data version upstream of them
    text = (
        (root / "params.yaml").read_text().replace("seed: 123                 # spam", "seed: 7                 # spam")
    )
    (root / "params.yaml").write_text(text)
    before = outs_version(read_lock(root)["prepare"])
    dvc(root, "repro", "--single-item", "prepare")
    assert set(shell_run_stages(instance, res)) == {"prepare"}
    dvc_stale = set(json.loads(dvc(root, "status", "--json")) or {})
    assert {"pretrain", "finetune_spam", "baseline_spam"} <= dvc_stale
    assert outs_version(read_lock(root)["prepare"]) != before


@pytest.mark.integration
def test_dagster_and_dg_cli_select_and_launch(tiny_run):
    """The CLIs a user runs, in the workspace tiny_run made: a selection string (Dagster's
    ANTLR grammar, in the same environment as DVC's `-S` parser), a materialization with run
    config that leaves params.yaml as it was, and dg on the same definitions."""
    from workflows.dvc_project import read_lock

    root = tiny_run.root
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DAGSTER_HOME": str(tiny_run.home),
        "GPTPKG_DVC_ROOT": str(root),
        "PYTHONPATH": str(root),
    }

    def run(*cmd: str) -> str:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout + p.stderr

    listed = run(str(BIN / "dagster"), "asset", "list", "--select", "group:classifier", "-m", "workflows")
    assert [line for line in listed.splitlines() if line and " " not in line] == ["baseline_spam", "finetune_spam"]
    before = (root / "params.yaml").read_bytes()
    config = json.dumps({"resources": {"dvc": {"config": {"set": ["baseline_spam.C=2.5"]}}}})
    out = run(str(BIN / "dagster"), "asset", "materialize", "--select", "baseline_spam", "-m", "workflows",
              "--config-json", config)  # fmt: skip
    assert "RUN_SUCCESS" in out and "did not receive any messages" not in out, out
    assert read_lock(root)["baseline_spam"]["params"]["params.yaml"]["baseline_spam.C"] == 2.5
    assert (root / "params.yaml").read_bytes() == before  # the run config held for the run only

    assert "All definitions loaded successfully." in run(str(BIN / "dg"), "check", "defs")
    out = run(str(BIN / "dg"), "launch", "--assets", "baseline_spam")  # back to params.yaml's C
    assert "RUN_SUCCESS" in out, out
    c = yaml.safe_load(before)["baseline_spam"]["C"]
    assert read_lock(root)["baseline_spam"]["params"]["params.yaml"]["baseline_spam.C"] == c != 2.5
    assert "baseline_spam" not in json.loads(dvc(root, "status", "--json", "baseline_spam") or "{}")


@pytest.mark.integration
def test_failing_stage_fails_its_asset_with_the_stage_error(tmp_path, stage_env, shared_data, monkeypatch, capfd):
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
    assert "`dvc repro --single-item fetch` failed" in str(failure.event_specific_data.error)
    err = capfd.readouterr().err  # the stage's stderr (Pipes forwards it to the step's)
    assert "gptpkg fetch: error:" in err and "SMSSpamCollection" in err and "expected" in err
    assert "failed to reproduce 'fetch'" in err
    assert not (root / "dvc.lock").exists()


# ---------------------------------------------------------------- the UI


def _need_chromium() -> None:
    from cdp import find_chromium

    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (.ci/run installs Debian's package)")
        pytest.skip("chromium is not installed here (CI installs it: apt-get install chromium)")


@contextlib.contextmanager
def _dagster_ui(command: list[str], root: Path, home: Path, log_path: Path):
    """A Dagster UI server (`dagster dev` or `dagster-webserver`) on a free loopback port,
    started in `root` on the instance in `home`; yields its base URL once it answers, and
    stops it (its whole process group) on the way out."""
    import signal
    import urllib.request

    from helpers import free_port, stop_group, wait_ready

    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "DAGSTER_HOME": str(home),
    }
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(BIN / command[0]), *command[1:], "-h", "127.0.0.1", "-p", str(port)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            try:
                wait_ready(server, f"http://127.0.0.1:{port}/server_info", timeout=300)
            except RuntimeError as e:
                pytest.fail(f"{e}:\n{log_path.read_text()[-3000:]}")
            # the community prompt ("Join the Dagster community") would pop up over the pages:
            # tell the server it has been seen, as its Skip button does
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/graphql",
                data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]["setNuxSeen"] is True
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_group(server, signal.SIGINT, timeout=60)


def _keep(shot: Path) -> None:
    """A copy of a screenshot in $GPTPKG_TEST_ARTIFACTS (default: test-artifacts/ here), for CI to keep."""
    dest = Path(os.environ.get("GPTPKG_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, dest / shot.name)


@pytest.mark.integration
def test_dagster_dev_shows_every_asset_in_headless_chromium(tmp_path):
    """`dagster dev` from a project root serves the asset graph; headless Chromium (driven over
    the DevTools protocol) sees every DVC stage as an asset; the screenshot is kept in
    test-artifacts/dagster_asset_graph.png."""
    from cdp import Browser

    _need_chromium()
    root = make_project(tmp_path / "proj", *UI_FILES)
    names = stage_names(root / "dvc.yaml")
    home = tmp_path / "dagster_home"
    home.mkdir()
    browser = None
    with _dagster_ui(["dagster", "dev"], root, home, tmp_path / "dagster_dev.log") as url:
        try:
            browser = Browser()
            browser.open(f"{url}/asset-groups")
            deadline = time.monotonic() + 180
            while "Global asset lineage" not in browser.text() or not any(
                g in browser.text() for g in ("data", "classifier")
            ):
                assert time.monotonic() < deadline, browser.text()[:2000]
                time.sleep(1)

            # "Expand all groups" (its keyboard shortcut, Alt+E) shows every asset node
            missing = names
            while missing:  # Alt+E toggles: press once, then give the layout time before pressing again
                for kind in ("rawKeyDown", "keyUp"):
                    browser.call(
                        "Input.dispatchKeyEvent",
                        type=kind,
                        modifiers=1,
                        key="e",
                        code="KeyE",
                        windowsVirtualKeyCode=69,
                    )
                for _ in range(20):
                    time.sleep(1)
                    missing = [n for n in names if n not in browser.text().split()]
                    if not missing:
                        break
                assert time.monotonic() < deadline, f"assets not shown in the graph: {missing}"
            shot = tmp_path / "dagster_asset_graph.png"
            browser.screenshot(shot)
            assert shot.stat().st_size > 10_000
            _keep(shot)
        finally:
            if browser is not None:
                browser.close()


# the Value cell of the metadata row `key` on an asset page (columns Key, Timestamp, Value)
METADATA_CELL = """(() => {
  for (const tr of document.querySelectorAll('tr')) {
    const cells = [...tr.cells];
    if (cells.length > 1 && cells[0].innerText.trim() === %s) return cells[cells.length - 1].innerText.trim();
  }
  return null;
})()"""
# click "[Show Markdown]" in the metadata row `key` (markdown metadata opens in a dialog)
SHOW_MARKDOWN = """(() => {
  for (const tr of document.querySelectorAll('tr')) {
    const cells = [...tr.cells];
    if (cells.length > 1 && cells[0].innerText.trim() === %s) {
      const link = [...tr.querySelectorAll('*')].find(e => e.children.length === 0
        && e.innerText && e.innerText.trim() === '[Show Markdown]');
      if (link) { link.click(); return true; }
    }
  }
  return false;
})()"""
# the open dialog titled `key`: its loaded images and tables
DIALOG = """(() => {
  const d = [...document.querySelectorAll('[role=dialog], .bp5-dialog, .bp4-dialog')]
    .find(e => e.innerText.includes(%s));
  if (!d) return null;
  const imgs = [...d.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).map(i => {
    const r = i.getBoundingClientRect();
    return {src: i.src, w: i.naturalWidth, h: i.naturalHeight, x: r.x, y: r.y, rw: r.width, rh: r.height};
  });
  const tables = [...d.querySelectorAll('table')].map(t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim())));
  return (imgs.length || tables.length) ? {imgs, tables} : null;
})()"""


def _png(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.integration
def test_asset_pages_show_the_materialization_in_headless_chromium(tiny_run, tmp_path):
    """The real webserver on the instance of a tiny materialization (tiny_run): the asset pages
    /assets/<key>, opened in headless Chromium, show that materialization's figures (the
    classifier's test accuracy and confusion matrix, pretraining's val_loss), its loss curves
    and confusion-matrix picture (pixel for pixel the PNG the stage wrote) and the instruction
    model's 10-item sample table. Screenshots under tmp_path, copies kept in test-artifacts/."""
    import base64

    import numpy as np
    from cdp import Browser
    from dagster import AssetKey

    _need_chromium()
    width, height = 1400, 900
    latest = {
        name: tiny_run.instance.get_latest_materialization_event(AssetKey(name)).asset_materialization.metadata
        for name in ("pretrain", "finetune_spam", "finetune_instruct")
    }
    pages = {  # asset: (figures shown in the metadata table, pictures behind "[Show Markdown]")
        "finetune_spam": (
            ["test_accuracy", "test_confusion"],
            ["plot_finetune_spam_confusion", "plot_finetune_spam_loss"],
        ),
        "pretrain": (["val_loss", "initial_val_loss"], ["plot_pretrain_loss"]),
    }
    browser = None
    with _dagster_ui(
        ["dagster-webserver", "-m", "workflows"], tiny_run.root, tiny_run.home, tmp_path / "ui.log"
    ) as url:
        try:
            browser = Browser(width, height)
            for asset, (figures, plots) in pages.items():
                md = latest[asset]
                browser.open(f"{url}/assets/{asset}")
                for key in figures:
                    shown = browser.wait_for(METADATA_CELL % json.dumps(key), 120, f"{asset}: metadata {key}")
                    want = md[key].value
                    if isinstance(want, float):
                        assert float(shown) == pytest.approx(want, rel=1e-12), (asset, key, shown)
                    else:
                        assert json.loads(shown) == want, (asset, key, shown)
                for key in plots:
                    assert browser.evaluate(SHOW_MARKDOWN % json.dumps(key)), f"{asset}: no [Show Markdown] for {key}"
                    # once the dialog's opening transition is over, the picture is drawn at its own size
                    dialog = browser.wait_for(
                        f"(d => d && d.imgs.length === 1 && d.imgs[0].rw === d.imgs[0].w && d.imgs[0].rh === d.imgs[0].h"
                        f" && d)({DIALOG % json.dumps(key)})",
                        30,
                        f"{asset}: the {key} picture, drawn at its own size",
                    )
                    (img,) = dialog["imgs"]
                    # the picture is the stage's PNG, carried in the materialization's metadata
                    uri = md[key].value.split("](", 1)[1].split(")", 1)[0]
                    assert img["src"] == uri and uri.startswith("data:image/png;base64,")
                    stage_png = _png(base64.b64decode(uri.split(",", 1)[1]))
                    assert (img["w"], img["h"]) == stage_png.size
                    shot = tmp_path / f"{key}.png"
                    page = _png(browser.screenshot(shot))
                    _keep(shot)
                    assert page.size == (width, height)
                    pixels = np.asarray(page, dtype=float)
                    assert pixels.std() > 10, f"{shot}: a blank page"
                    x, y = round(img["x"]), round(img["y"])
                    region = pixels[y : y + stage_png.size[1], x : x + stage_png.size[0]]
                    assert region.shape[:2] == (stage_png.size[1], stage_png.size[0]), f"{key} drawn off screen"
                    diff = np.abs(region - np.asarray(stage_png, dtype=float)).mean()
                    assert diff < 8, f"{key}: the screenshot differs from the stage's PNG by {diff:.1f} per channel"
                    browser.call(
                        "Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27
                    )
                    browser.call(
                        "Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape", windowsVirtualKeyCode=27
                    )
                    browser.wait_for(f"!({DIALOG % json.dumps(key)})", 30, f"{asset}: the {key} dialog closes")

            # the instruction model's sample: a 10-row table (instruction, reference, model, ROUGE-L, ...)
            browser.open(f"{url}/assets/finetune_instruct")
            browser.wait_for(METADATA_CELL % json.dumps("test_rouge_l"), 120, "finetune_instruct: test_rouge_l")
            assert browser.evaluate(SHOW_MARKDOWN % json.dumps("test_sample")), "no [Show Markdown] for test_sample"
            dialog = browser.wait_for(DIALOG % json.dumps("test_sample"), 30, "the test_sample table")
            (table,) = dialog["tables"]
            assert table[0] == ["instruction", "reference", "model", "ROUGE-L", "baseline", "ROUGE-L"]
            rows = [
                [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                for line in latest["finetune_instruct"]["test_sample"].value.splitlines()[2:]
            ]
            assert len(table) - 1 == len(rows) == 10
            assert [(r[3], r[5]) for r in table[1:]] == [(r[3], r[5]) for r in rows]  # the ROUGE-L columns
            time.sleep(0.5)
            shot = tmp_path / "finetune_instruct_test_sample.png"
            page = _png(browser.screenshot(shot))
            _keep(shot)
            assert page.size == (width, height) and np.asarray(page, dtype=float).std() > 10
        finally:
            if browser is not None:
                browser.close()

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptpkg.cli import build_parser
from gptpkg.pipeline import STAGES

COMMANDS = list(STAGES) + ["generate", "presets", "profile", "dvc-yaml", "params-doc"]
ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gptpkg " + name in out
    if name in STAGES:
        assert STAGES[name].help in " ".join(out.split())


def test_presets_prints_gpt2_small_count():
    out = subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", "presets"], capture_output=True, text=True, check=True
    ).stdout
    assert "124,439,808" in out


def test_a_bad_override_is_a_clear_error_before_any_work(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptpkg.cli",
            "pretrain",
            "--set",
            "pretrain.compile=maybe",
            "--set",
            f"paths.pretrained={tmp_path / 'pre'}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "gptpkg pretrain: error: params.pretrain.compile: expected true|false or auto, got 'maybe'" in r.stderr
    assert not (tmp_path / "pre").exists()


def test_fetch_imports_no_torch_and_prepare_no_model():
    code = (
        "import sys; from gptpkg.cli import main; from gptpkg.pipeline import STAGES; "
        "STAGES['fetch'].function(); assert 'torch' not in sys.modules; "
        "STAGES['prepare'].function(); assert 'gptpkg.model' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stage_help_lists_its_params_keys(monkeypatch, capsys):
    from gptpkg.config import PretrainConfig

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "keys of params.yaml section 'pretrain'" in out
    assert "  lr (a number >= 0; params.yaml: 0.001)\n      peak learning rate of AdamW" in out
    assert "  sparse_embedding (true|false; default: true)" in out  # a loop key that params.yaml leaves out
    assert all(f"\n  {key} (" in out for key in PretrainConfig.model_fields)


def test_params_doc_is_current(tmp_path, capsys):
    from gptpkg.cli import main, params_markdown

    assert (ROOT / "docs" / "params.md").read_text(encoding="utf-8") == params_markdown(), "run `gptpkg params-doc`"
    assert main(["params-doc", str(tmp_path / "params.md")]) == 0
    text = (tmp_path / "params.md").read_text(encoding="utf-8")
    assert "| `decision_spam_share` | null (decide as trained) or a spam share strictly between 0 and 1 |" in text
    assert "| `precision` | auto\\|fp32\\|bf16 | auto: bf16 autocast on CUDA, fp32 elsewhere |" in text


def test_out_dir_tries_leave_the_pipeline_outputs_alone(tmp_path, shared_data):
    """fetch, prepare and pretrain with --out: each writes under DIR and reads what the one
    before it wrote there; the pipeline's own paths stay as they were."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "pretrain.json").write_text('{"val_loss": 1.0}')
    env = {**os.environ, "GPTPKG_DATA_MIRROR": str(shared_data), "WANDB_MODE": "offline"}
    for stage in ("fetch", "prepare", "pretrain"):
        cmd = [sys.executable, "-m", "gptpkg.cli", stage, "--profile", "tiny", "--out", "tries/t", "--no-progress"]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    t = tmp_path / "tries" / "t"
    assert (t / "models" / "pretrained" / "model.safetensors").is_file()
    assert json.loads((t / "metrics" / "pretrain.json").read_text())["val_loss"] > 0
    assert (t / "metrics" / "runtime" / "pretrain.json").is_file() and (t / "plots" / "pretrain.json").is_file()
    assert list((t / "wandb_runs").iterdir())
    assert (t / "data" / "processed").is_dir() and (t / "data" / "raw" / "SMSSpamCollection").is_file()
    # the pipeline's paths: untouched (no data, no models, the metrics file as it was); only
    # the token cache, addressed by file content, is shared with the pipeline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "metrics", "params.yaml", "profiles", "tries"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["token_cache"]
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["pretrain.json"]
    assert (tmp_path / "metrics" / "pretrain.json").read_text() == '{"val_loss": 1.0}'

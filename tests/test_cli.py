import subprocess
import sys

import pytest

from gptpkg.cli import build_parser
from gptpkg.pipeline import STAGES

COMMANDS = list(STAGES) + ["generate", "presets", "profile", "dvc-yaml"]


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

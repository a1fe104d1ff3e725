import subprocess
import sys

import pytest

from gptpkg.cli import STAGE_HELP, build_parser

COMMANDS = list(STAGE_HELP) + ["generate", "presets"]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "gptpkg.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    assert "usage: gptpkg " + name in capsys.readouterr().out


def test_presets_prints_gpt2_small_count():
    out = subprocess.run([sys.executable, "-m", "gptpkg.cli", "presets"], capture_output=True, text=True, check=True).stdout
    assert "124,439,808" in out

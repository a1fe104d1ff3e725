"""The declared dependency floors and the floors venv of `.ci/run` say the same."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_floors_file_pins_every_declared_floor():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    declared = {}
    for line in [*project["dependencies"], *extras["serving"], *extras["dev"]]:
        req = Requirement(line)
        low = [s.version for s in req.specifier if s.operator == ">="]
        if low:
            declared[req.name.lower()] = Version(low[0])
    pinned = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = Version(version)
    # floors.txt pins what the floors venv installs: the core, serving and test dependencies
    wanted = {n: v for n, v in declared.items() if n not in ("transformers", "ruff")}
    assert pinned == wanted

"""Dagster orchestration of the gptpkg DVC pipeline: one asset per DVC stage.

`dagster dev` (from the repository root, see pyproject.toml [tool.dagster]) loads `defs`."""

from .definitions import build_definitions

defs = build_definitions()

__all__ = ["build_definitions", "defs"]

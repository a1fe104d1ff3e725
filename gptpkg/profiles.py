"""params.yaml with a profile and overrides merged over it, and `gptpkg profile`'s
writer that puts those keys into params.yaml itself, keeping its comments.

A profile (`profiles/NAME.yaml`) and a `--set section.key=value` override may change
only keys that params.yaml already has, so a typo is an error rather than a new key.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, Params


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _set_key(params: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """params[section][key] = value, where the key must already exist (catches typos)."""
    sec, _, key = dotted.partition(".")
    if not isinstance(params.get(sec), dict) or key not in params[sec]:
        raise ConfigError(f"{where}: no key {dotted!r} in params.yaml (expected section.key)")
    params[sec] = {**params[sec], key: value}


def merged_params(
    path: str | Path = "params.yaml", overrides: Sequence[str] = (), profile: str | None = None
) -> dict[str, Any]:
    """params.yaml as a dict, with `profiles/<profile>.yaml` merged over it and then the
    `section.key=value` overrides (values parsed as YAML); only existing keys may change."""
    path = Path(path)
    params = read_yaml(path)
    if profile:
        prof_file = path.parent / "profiles" / f"{profile}.yaml"
        if not prof_file.is_file():
            known = sorted(p.stem for p in prof_file.parent.glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r}: {prof_file} not found; profiles: {known}")
        for sec, keys in read_yaml(prof_file).items():
            if not isinstance(keys, Mapping):
                raise ConfigError(f"{prof_file}: section {sec!r} must be a mapping of keys")
            for key, value in keys.items():
                _set_key(params, f"{sec}.{key}", value, str(prof_file))
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r}: expected section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from None
        _set_key(params, key.strip(), value, f"override {text!r}")
    return params


def apply_profile(params_file: str | Path, profile: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """Write the keys a profile and overrides change into `params_file` in place (comments
    and key order kept), so `dvc repro` and `dvc exp run` run with them and dvc.lock
    records them. Returns the changed keys ("section.key"). Nothing is written when
    nothing changes or the result would not parse."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    from .files import atomic_write_text

    params_file = Path(params_file)
    merged = merged_params(params_file, overrides, profile)
    Params.parse(merged, "params")  # validate before writing anything
    base = read_yaml(params_file)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    # So every YAML 1.1 reader (PyYAML) reads the same values back: 5e-05 would be a
    # string there (it needs "5.0e-05"), and null stays spelled out.
    rt.representer.add_representer(
        float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", yaml.safe_dump(v).split("\n")[0])
    )
    rt.representer.add_representer(type(None), lambda r, v: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_file.read_text(encoding="utf-8"))
    changed = []
    for sec, keys in merged.items():
        for key, value in keys.items():
            if base[sec].get(key) == value and type(base[sec].get(key)) is type(value):
                continue  # keep its spelling
            changed.append(f"{sec}.{key}")
            if isinstance(value, list):
                value = CommentedSeq(value)
                value.fa.set_flow_style()
            doc[sec][key] = value
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        atomic_write_text(params_file, buf.getvalue())
    return changed

"""Small helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """A training run killed mid-step (raised by `dying`)."""


def dying(loss_fn: Callable, at_call: int) -> Callable:
    """`loss_fn`, except that its `at_call`-th call raises `Interrupted`: a run killed
    during that micro-batch, after the checkpoints written before it."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Interrupted
        return loss_fn(model, batch)

    return loss


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process started with `start_new_session=True` and its children: `sig` to
    its process group, SIGKILL if it is still there after `timeout` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Wait until GET `url` answers 200; RuntimeError when `proc` exits first or after
    `timeout` seconds (the caller stops `proc` and shows its output)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.5)


def prepared_tiny_workspace(root: Path) -> Path:
    """`root` made a pipeline workspace on the tiny profile (this repo's params.yaml and
    profiles) whose fetch and prepare stages have run (from the offline mirror)."""
    from gptpkg.config import load_params
    from gptpkg.profiles import apply_profile
    from gptpkg.runner import run_stage

    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(ROOT / "profiles", root / "profiles")
    apply_profile(root / "params.yaml", "tiny")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml")
        run_stage("fetch", params)
        run_stage("prepare", params)
    finally:
        os.chdir(cwd)
    return root


def params_in(root: Path, *overrides: str, profile: str | None = None):
    """This repo's params (optionally a profile), every path moved under `root`, W&B
    disabled, the export's accuracy floor at 0 (test classifiers train for a few steps),
    then `overrides` (section.key=value): the typed `Params` a stage takes."""

    from gptpkg.config import load_params

    base = load_params(ROOT / "params.yaml", profile=profile)
    paths = [f"paths.{k}={Path(root) / v}" for k, v in base.paths.model_dump().items()]
    return load_params(
        ROOT / "params.yaml", [*paths, "wandb.mode=disabled", "export_onnx.min_test_accuracy=0.0", *overrides], profile
    )

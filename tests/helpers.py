"""Small helpers shared by several test files (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable


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

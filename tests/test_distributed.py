"""DDP in `fit`: two CPU processes (gloo) against one process on the same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

from gptpkg import distributed
from gptpkg.config import TrainConfig
from gptpkg.data import TokenWindows
from gptpkg.loggers import NullLogger
from gptpkg.model import GPT
from gptpkg.presets import model_config


class FileLogger(NullLogger):
    """Appends each logged row to a file: shows which rank logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def log(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


CFG = TrainConfig(
    lr=1e-3,
    warmup_steps=1,
    epochs=1.0,
    max_steps=3,
    batch_size=4,
    grad_accum_steps=2,
    eval_every=2,
    seed=7,
    device="cpu",
    compile=False,
    precision="fp32",
)


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _train(out: Path, rank: int):
    from gptpkg.train import Task, fit, plan_run

    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=500, context_length=16, drop_rate=0.0))
    ids = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(1))
    data = TokenWindows(ids, 16, 16)

    def eval_fn(m):  # each rank reports something different: fit must average it
        return {"rank_value": float(rank)}

    result = fit(
        model,
        plan_run(CFG, model, data, _collate),
        Task(data, eval_fn=eval_fn, checkpoint_dir=out / "ckpt"),
        SimpleNamespace(logger=FileLogger(out / f"log{rank}.jsonl"), resume=False, progress=False),
    )
    torch.save(model.state_dict(), out / f"weights{rank}.pt")
    (out / f"result{rank}.json").write_text(
        json.dumps({"tokens": result.tokens_seen, "examples": result.examples_seen, "history": result.history})
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        _train(Path(out), rank)
    finally:
        distributed.teardown()


@pytest.mark.integration
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    mp.spawn(_worker, args=(2, free_port(), str(ddp)), nprocs=2, join=True)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    _train(single, 0)

    one = torch.load(single / "weights0.pt")
    for rank in (0, 1):  # both ranks end with the one-process weights
        got = torch.load(ddp / f"weights{rank}.pt")
        for name, w in one.items():
            torch.testing.assert_close(got[name], w, atol=2e-5, rtol=1e-4, msg=name)
    r_ddp = json.loads((ddp / "result0.json").read_text())
    r_one = json.loads((single / "result0.json").read_text())
    assert r_ddp["tokens"] == r_one["tokens"] == 3 * 2 * 4 * 16  # steps * accum * batch * T
    assert r_ddp["examples"] == r_one["examples"]
    for a, b in zip(r_ddp["history"], r_one["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert [h["rank_value"] for h in r_ddp["history"]] == [0.5, 0.5]  # averaged over ranks
    # only rank 0 logs and writes the checkpoint
    assert (ddp / "log0.jsonl").read_text().strip()
    assert (ddp / "log1.jsonl").read_text() == ""
    assert (ddp / "ckpt" / "model.safetensors").is_file()
    assert json.loads((ddp / "ckpt" / "config.json").read_text())["meta"]["params"] == CFG.training_params()


def test_shard_splits_a_global_batch_evenly_and_refuses_uneven_splits():
    ctx = [distributed.DistContext(rank=r, world_size=3) for r in range(3)]
    batch = list(range(6))
    assert [distributed.shard(batch, c) for c in ctx] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        distributed.shard(list(range(4)), ctx[0])


def test_env_context_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_context() == distributed.DistContext(0, 1, 0)
    assert distributed.is_main_process()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (3, 4, 1, False, True)
    assert not distributed.is_main_process()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(RuntimeError, match="RANK=4"):
        distributed.env_context()
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"


@pytest.mark.integration
def test_a_torchrun_pretraining_exits_within_seconds_of_its_final_checkpoint(tmp_path):
    """`torchrun` with two CPU ranks (gloo) through the CLI: the final eval, the final
    checkpoint, the process group left, then both ranks and torchrun exit within seconds
    (on a loaded 2-core machine), and one summary is printed, not one per rank."""
    import shutil
    import subprocess
    import sys
    import time

    from helpers import prepared_tiny_workspace

    root = prepared_tiny_workspace(tmp_path)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch, next to the interpreter"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gptpkg.cli", "pretrain", "--no-progress"]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    exited = time.time()
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    final = root / "models" / "pretrained" / "model.safetensors"
    after_checkpoint = exited - final.stat().st_mtime
    assert 0 < after_checkpoint < 10, f"torchrun exited {after_checkpoint:.1f} s after the final checkpoint"
    assert run.stdout.count('"initial_val_loss"') == 1, run.stdout
    metrics = json.loads((root / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 6

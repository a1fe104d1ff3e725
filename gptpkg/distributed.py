"""Data-parallel training under `torchrun`: the few helpers `fit` needs.

`torchrun` starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. `setup()` reads them, joins the process group (NCCL on
CUDA, gloo on CPU) and picks this rank's device. Without those variables (a plain
`gptpkg pretrain`) it returns a one-process context and nothing else changes.

Each optimizer step consumes one global batch of `batch_size` examples per micro-batch;
rank r trains on the r-th contiguous slice of it (`shard`), DDP averages the gradients,
so the step equals a one-process step on the whole global batch. Only rank 0 writes
checkpoints, metrics and logs.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_context() -> DistContext:
    """The rank layout torchrun put in the environment (one process when unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def is_main_process() -> bool:
    """True on rank 0 and in any run without torchrun (gates logs and files)."""
    return env_context().is_main


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group once (idempotent) and return (context, this rank's device).

    On CUDA every rank takes `cuda:LOCAL_RANK`; on CPU all ranks use the CPU.
    """
    ctx = env_context()
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), rank=ctx.rank, world_size=ctx.world_size)
        atexit.register(teardown)
    return ctx, device


def teardown() -> None:
    """Leave the process group (a no-op outside one). Called by the runner once a training
    stage's outputs are written, and at exit as a fallback."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def stop_compile_workers() -> None:
    """Stop torch.compile's background compile workers if this process started them.

    Inductor compiles kernels in a pool of worker processes (up to 32, one per core) and
    otherwise stops it only at interpreter exit, where a pool still warming up after a
    cold start can hold the exit for a long time; PyTorch's maintainers point users to
    this call once no more compilation is expected (there is no public API for it)."""
    module = sys.modules.get("torch._inductor.async_compile")  # imported by the first compile
    stop = getattr(module, "shutdown_compile_workers", None)
    if stop is not None:
        stop()


def shard(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's contiguous slice of one global micro-batch (equal sizes required, so
    that the mean of the ranks' mean losses is the global batch's mean loss)."""
    n = len(indices)
    if n % ctx.world_size:
        raise ValueError(
            f"a global batch of {n} examples does not split evenly over {ctx.world_size} "
            f"ranks; set batch_size to a multiple of the number of processes"
        )
    k = n // ctx.world_size
    return list(indices[ctx.rank * k : (ctx.rank + 1) * k])


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself when not distributed)."""
    if not ctx.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def mean_metrics(metrics: dict, ctx: DistContext, device: torch.device) -> dict:
    """Average the numeric metrics of every rank (eval run on each rank's part, or
    the same value everywhere); other values are rank 0's."""
    if not ctx.enabled:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not keys:
        return metrics
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {**metrics, **{k: v / ctx.world_size for k, v in zip(keys, t.tolist())}}


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DDP around `model` (which is already on `device`); the model itself otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)

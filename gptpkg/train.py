"""The one training loop, used by pretraining, classifier and instruction fine-tuning.

`fit` owns: AdamW (`optim.make_optimizer`), linear warmup + cosine decay, gradient
accumulation and clipping, bf16 autocast and `torch.compile` on CUDA, periodic eval,
progress with tokens/s, atomic checkpoints and resume, and a loud stop on a non-finite
loss. What is decided before the first step (device, precision, DDP, steps, compile,
batches) is a `RunPlan`, made once by `plan_run`; what differs between trainings (data,
loss, eval, checkpoint folder) is a `Task`: `fit(model, plan, task, ctx)`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed, optim
from .config import TrainConfig
from .errors import GptpkgError
from .loggers import MetricLogger, NullLogger
from .losses import LossFn, lm_loss
from .losses import classification_loss as classification_loss  # where stages have imported it from
from .perf import flops_per_token

EvalFn = Callable[[nn.Module], dict[str, float]]
# A batch plan maps an epoch number to that epoch's micro-batches (index lists): a list,
# or a sequence that cuts them on demand (`EpochBatches`).
BatchPlan = Callable[[int], Sequence[list[int]]]


class TrainingDiverged(GptpkgError, RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------
# Devices, precision, schedule


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA devices that support it (precision auto or bf16); fp32 on
    CPU unless bf16 is asked for explicitly."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# `compile: auto` compiles only where compiling earns back its own cost: on CUDA, for a
# stage whose planned training work (FLOPs per token x planned tokens) reaches this many
# FLOPs. Below it the compile time outweighs the faster steps (short trainings, and the
# fine-tunings' varying lengths recompile); on CPU the gain is a few percent at best, with
# other numerics than the README's figures, so auto stays eager there. The measurements
# behind the threshold: docs/performance.md, "compile: auto"; `bench/gpu_check.sh` times
# both ways.
COMPILE_MIN_FLOPS = 4e15


def planned_flops(model: nn.Module, steps: int, cfg: TrainConfig) -> float:
    """Training FLOPs of the plan (`perf.flops_per_token`, LM head included), with every
    sequence at its full `max_length`: an upper bound for the fine-tunings, whose bucketed
    batches are shorter and whose head is smaller."""
    seq_len = getattr(cfg, "max_length", model.cfg.context_length)
    return float(flops_per_token(model.cfg, seq_len)) * steps * cfg.grad_accum_steps * cfg.batch_size * seq_len


def should_compile(setting: bool | str, device: torch.device, flops: float = math.inf) -> bool:
    """compile: true | false | auto (CUDA, and `flops` of planned work >= COMPILE_MIN_FLOPS)."""
    if setting == "auto":
        return device.type == "cuda" and flops >= COMPILE_MIN_FLOPS
    return setting is True


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to lr * min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------
# Batches


class EpochBatches(Sequence):
    """One epoch's micro-batches of a permutation, cut on demand: 8 bytes an example
    (the permutation), never a list of every batch, so the order of a corpus of
    millions of windows costs little memory."""

    def __init__(self, perm: torch.Tensor, batch_size: int) -> None:
        self.perm, self.batch_size = perm, batch_size

    def __len__(self) -> int:
        return len(self.perm) // self.batch_size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __eq__(self, other) -> bool:  # equal batches in the same order, as a list's
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None


def shuffled_batches(n: int, batch_size: int, seed: int) -> BatchPlan:
    """Each epoch a fresh permutation (seeded by seed + epoch), cut into full batches."""
    if n < batch_size:
        raise ValueError(f"training set has {n} examples, fewer than batch_size={batch_size}")

    def plan(epoch: int) -> EpochBatches:
        g = torch.Generator().manual_seed(seed + epoch)
        return EpochBatches(torch.randperm(n, generator=g), batch_size)

    return plan


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, pool_batches: int = 64) -> BatchPlan:
    """Length-bucketed batches: each epoch (seeded by seed + epoch) shuffle, cut the
    order into pools of `pool_batches` batches, sort each pool by length, cut it into
    batches, then shuffle the batch order. Texts of similar length share a batch, so
    per-batch padding wastes little. Every example is in exactly one batch per epoch
    (the last batch of a pool may be smaller). A function of the epoch, so resume
    replays the same order."""
    n = len(lengths)
    if n < batch_size:
        raise ValueError(f"training set has {n} examples, fewer than batch_size={batch_size}")
    lengths = [int(x) for x in lengths]
    pool = batch_size * pool_batches

    def plan(epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        batches = []
        for p in range(0, n, pool):
            chunk = sorted(perm[p : p + pool], key=lengths.__getitem__)  # stable: ties stay shuffled
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    return plan


def batch_plan_for(batching: str, lengths: Sequence[int], batch_size: int, seed: int) -> BatchPlan:
    """The plan for a fine-tuning `batching` setting (bucketed | shuffled | pad_longest):
    `bucketed` groups similar lengths; `shuffled` and `pad_longest` (the book's: every
    text padded to the longest in the training set, done by the collate) draw random
    batches."""
    if batching == "bucketed":
        return bucketed_batches(lengths, batch_size, seed)
    return shuffled_batches(len(lengths), batch_size, seed)


def _micro_batches(plan: BatchPlan, skip: int) -> Iterator[list[int]]:
    """Micro-batches over epochs 0, 1, 2, ..., skipping the first `skip` (on resume)."""
    epoch = 0
    while True:
        batches = plan(epoch)
        if not batches:
            raise ValueError("the batch plan produced no batches for an epoch")
        if skip >= len(batches):
            skip -= len(batches)
        else:
            for i in range(skip, len(batches)):
                yield batches[i]
            skip = 0
        epoch += 1


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; to CUDA from pinned memory, so the copy runs
    beside the GPU's work instead of before it."""
    pin = device.type == "cuda"

    def move(v):
        if not torch.is_tensor(v):
            return v
        if pin and v.device.type == "cpu":
            v = v.pin_memory()
        return v.to(device, non_blocking=True)

    return {k: move(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------
# The run plan: every decision made before the first step, made once


class RunContext(Protocol):
    """What `fit` reads from a stage's context (a `stages.StageContext`)."""

    logger: MetricLogger
    resume: bool  # continue from the task's checkpoint
    progress: bool  # progress bars


@dataclass(frozen=True)
class RunPlan:
    """How a training runs, decided once by `plan_run` (and, for the fine-tunings, its
    collate by `finetune.finetune_plan`, which reads `compiled`); `fit` only reads it."""

    cfg: TrainConfig  # the stage's params section
    dist: distributed.DistContext
    device: torch.device  # this rank's
    dtype: torch.dtype | None  # autocast's; None = fp32
    batches: BatchPlan  # epoch -> its micro-batches (lists of training-set indices)
    collate: Callable[[list], dict]  # training items -> a batch of tensors
    steps: int  # optimizer steps
    flops: float  # planned training FLOPs (`planned_flops`), what compile auto weighs
    compiled: bool  # train through torch.compile
    dynamic: bool | None  # torch.compile's: True = one graph for varying shapes


def total_steps(n_batches_per_epoch: int, cfg: TrainConfig) -> int:
    per_epoch = n_batches_per_epoch // cfg.grad_accum_steps
    if per_epoch < 1 and cfg.max_steps == 0:
        raise ValueError(
            f"an epoch has {n_batches_per_epoch} micro-batches, fewer than "
            f"grad_accum_steps={cfg.grad_accum_steps}: no optimizer step would run"
        )
    steps = math.ceil(cfg.epochs * per_epoch) if cfg.epochs else cfg.max_steps
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    return max(1, steps)


def plan_run(
    cfg: TrainConfig,
    model: nn.Module,
    train_set,
    collate: Callable[[list], dict],
    batches: BatchPlan | None = None,
    dynamic: bool | None = None,
) -> RunPlan:
    """The plan for training `model` on `train_set` as `cfg` says: joins the process group
    under torchrun (`distributed.setup`). `batches` defaults to `shuffled_batches`;
    `dynamic` is torch.compile's: True for batches whose shapes vary (the fine-tunings),
    None specializes on the first shape (pretraining's are fixed)."""
    dist_ctx, device = distributed.setup(resolve_device(cfg.device))
    batches = batches or shuffled_batches(len(train_set), cfg.batch_size, cfg.seed)
    steps = total_steps(len(batches(0)), cfg)
    flops = planned_flops(model, steps, cfg)
    return RunPlan(
        cfg=cfg,
        dist=dist_ctx,
        device=device,
        dtype=autocast_dtype(cfg.precision, device),
        batches=batches,
        collate=collate,
        steps=steps,
        flops=flops,
        compiled=should_compile(cfg.compile, device, flops),
        dynamic=dynamic,
    )


@dataclass(frozen=True)
class Task:
    """What a training learns from and what it leaves: `fit`'s other half beside the plan."""

    train_set: Any  # len() and [i] -> an item the plan's collate takes
    loss_fn: LossFn = lm_loss
    eval_fn: EvalFn | None = None  # every cfg.eval_every steps and at the end
    # Runs once training is over, before the final checkpoint (e.g. a decision rule that
    # training must not see).
    finalize: Callable[[nn.Module], None] | None = None
    checkpoint_dir: str | Path | None = None  # None: no checkpoints, no resume
    meta: dict[str, Any] = field(default_factory=dict)  # into the checkpoint's config.json
    desc: str = "train"  # the progress bar's label


# ---------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    batches: Iterator[dict] | list[dict],
    loss_fn: LossFn,
    device: torch.device,
    max_batches: int = 0,
    dtype: torch.dtype | None = None,
) -> float:
    """Mean of `loss_fn` over (up to `max_batches` of) `batches`, in eval mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        with autocast(device, dtype):
            loss, _ = loss_fn(model, to_device(batch, device))
        total += loss.item()
        n += 1
    model.train(was_training)
    return total / max(n, 1)


class Batches(Sequence):
    """A dataset in order, collated into batches of `batch_size` when read (for eval):
    a validation split of any size costs one batch of memory at a time."""

    def __init__(self, dataset, collate: Callable, batch_size: int) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo = i * self.batch_size
        return self.collate([self.dataset[j] for j in range(lo, min(lo + self.batch_size, len(self.dataset)))])


def batches_of(dataset, collate: Callable, batch_size: int) -> Batches:
    """The dataset in order, collated into batches (for eval)."""
    return Batches(dataset, collate, batch_size)


# ---------------------------------------------------------------------------------
# fit


@dataclass
class FitResult:
    steps: int
    tokens_seen: int
    examples_seen: int
    wall_time_s: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    compiled: bool = False  # trained through torch.compile

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# History fields that measure the machine, not the model.
TIMING_KEYS = frozenset({"elapsed_s", "tokens_per_s"})


@dataclass
class Progress:
    """Where a training stands: what a resumable checkpoint carries besides weights."""

    step: int = 0
    tokens: int = 0
    examples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds trained by earlier processes (resume)
    started: float = field(default_factory=time.perf_counter)
    # The loader's position: micro-batches of the batch plan consumed so far.
    micro_batches: int = 0

    def advance(self, tokens: int, examples: int, micro_batches: int) -> None:
        """One optimizer step done, over `micro_batches` of the plan."""
        self.step, self.tokens, self.examples = self.step + 1, self.tokens + tokens, self.examples + examples
        self.micro_batches += micro_batches

    def result(self, wall_time_s: float) -> FitResult:
        return FitResult(
            steps=self.step,
            tokens_seen=self.tokens,
            examples_seen=self.examples,
            wall_time_s=wall_time_s,
            tokens_per_s=self.tokens / max(wall_time_s, 1e-9),
            history=self.history,
        )

    def elapsed_s(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def state(self, final: bool, train_examples: int) -> dict[str, Any]:
        """The trainer state to save. The final one is a pipeline output: timings are
        left out, so the same params and seed give byte-identical files. `loader` is
        where the batch plan stands, and over how many training examples (windows)."""
        history = (
            [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in self.history] if final else self.history
        )
        return {
            "step": self.step,
            "tokens": self.tokens,
            "examples": self.examples,
            "history": history,
            "elapsed": 0.0 if final else self.elapsed_s(),
            "loader": {"micro_batches": self.micro_batches, "examples": train_examples},
        }


class Window:
    """Mean loss and tokens/s over the optimizer steps since the last eval."""

    def __init__(self) -> None:
        self.loss, self.n, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.n, self.tokens = self.loss + loss, self.n + 1, self.tokens + tokens

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.n, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


class DataChanged(GptpkgError, ValueError):
    """`--resume` onto training data other than the checkpoint's."""


def restore(model: nn.Module, optimizer, plan: RunPlan, task: Task) -> Progress | None:
    """Load a resumable checkpoint into `model` and `optimizer`; None when there is none.
    It must have been trained with the same training params as `plan.cfg`, on a
    training set of the same size; the loader continues where it stood."""
    checkpoint_dir = task.checkpoint_dir
    state = ckpt.load_trainer_state(checkpoint_dir)
    if state is None:
        return None
    ckpt.check_same_training(checkpoint_dir, plan.cfg.training_params())
    loader = state.get("loader", {"micro_batches": int(state["step"]) * plan.cfg.grad_accum_steps})
    if loader.get("examples", len(task.train_set)) != len(task.train_set):
        raise DataChanged(
            f"{checkpoint_dir}: trained on {loader['examples']} training examples, the data now holds "
            f"{len(task.train_set)}: the training data changed (prepare ran again?); run without --resume"
        )
    saved, _ = ckpt.load_checkpoint(checkpoint_dir, map_location=plan.device)
    ckpt.unwrap(model).load_state_dict(saved.state_dict())
    optim.load_optimizer_state(optimizer, state["optimizer"])
    torch.set_rng_state(state["rng"])
    return Progress(
        step=int(state["step"]),
        tokens=int(state["tokens"]),
        examples=int(state["examples"]),
        history=list(state["history"]),
        elapsed=float(state["elapsed"]),
        micro_batches=int(loader["micro_batches"]),
    )


def save(
    model: nn.Module, plan: RunPlan, task: Task, progress: Progress, optimizer=None, final: bool = True, **extra_meta
) -> None:
    """The one way a trained model folder is written (`task.checkpoint_dir`; nothing when
    None): by rank 0 while the other ranks wait. config.json's meta is `task.meta`, the
    step, the training params (what `--resume` compares), then `extra_meta`. With the
    `optimizer` it is resumable: trainer.pt holds the optimizer, the RNG and `progress`
    (`final`: without timings, so the same run writes the same bytes)."""
    if task.checkpoint_dir is None:
        return
    if plan.dist.is_main:
        trainer = None
        if optimizer is not None:
            optim.flush(optimizer)
            trainer = {
                **progress.state(final, len(task.train_set)),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
            }
        ckpt.save_checkpoint(
            task.checkpoint_dir,
            model,
            meta={**task.meta, "step": progress.step, "params": plan.cfg.training_params(), **extra_meta},
            trainer_state=trainer,
        )
    distributed.barrier(plan.dist)


def train_batches(plan: RunPlan, train_set, skip: int) -> Iterator[dict]:
    """The plan's micro-batches after the first `skip`, this rank's slice of each,
    collated and on the device."""
    for idx in _micro_batches(plan.batches, skip):
        if plan.dist.enabled:
            idx = distributed.shard(idx, plan.dist)
        yield to_device(plan.collate([train_set[i] for i in idx]), plan.device)


def train_step(
    run_model: nn.Module, batches: Iterator[dict], loss_fn: LossFn, plan: RunPlan
) -> tuple[torch.Tensor, int, int]:
    """Forward and backward over `grad_accum_steps` micro-batches of `batches`: (mean
    loss on the device, tokens, examples), the counts over all ranks."""
    accum, dist_ctx = plan.cfg.grad_accum_steps, plan.dist
    step_loss, tokens, examples = torch.zeros((), device=plan.device), 0, 0
    for k in range(accum):
        batch = next(batches)
        # DDP: average gradients across ranks only on the last micro-batch.
        sync = k == accum - 1 or not dist_ctx.enabled
        with contextlib.nullcontext() if sync else run_model.no_sync():
            with autocast(plan.device, plan.dtype):
                loss, n_tok = loss_fn(run_model, batch)
            (loss / accum).backward()
        step_loss += loss.detach() / accum
        tokens += n_tok * dist_ctx.world_size  # every rank trains on an equal slice
        examples += batch["input_ids"].shape[0] * dist_ctx.world_size
    return step_loss, tokens, examples


# Optimizer steps between reads of the loss on the host. Reading it waits for the GPU to
# finish the step (a host sync that leaves it idle while the next step is queued), so on
# CUDA the losses of several steps are read at once; on CPU a read costs nothing.
LOSS_READ_EVERY = {"cuda": 16}


def loss_read_every(device: torch.device) -> int:
    return LOSS_READ_EVERY.get(device.type, 1)


class LossLog:
    """Step losses stay on the device until read: every `every` steps and before any
    eval, checkpoint or the end, in one host sync. A non-finite loss then stops the run
    (TrainingDiverged), up to `every` steps late but before anything is written; every
    step's loss is logged (W&B), in order."""

    def __init__(self, every: int, dist_ctx, logger: MetricLogger, checkpoint_dir) -> None:
        self.every, self.dist_ctx, self.logger, self.checkpoint_dir = every, dist_ctx, logger, checkpoint_dir
        self.pending: list[tuple[torch.Tensor, float, int]] = []  # (loss on the device, lr, tokens)

    def add(self, loss: torch.Tensor, lr: float, tokens: int) -> None:
        self.pending.append((loss, lr, tokens))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def read(self, step: int, window: Window, bar, last_is_eval: bool) -> None:
        """Check and log the pending losses of the steps up to `step` into `window`; the
        last one is not logged when its step is an eval step (the eval row says it)."""
        if not self.pending:
            return
        values = distributed.mean_across_ranks(torch.stack([p[0] for p in self.pending]), self.dist_ctx).tolist()
        first = step - len(self.pending) + 1
        for i, (value, (_, lr, tokens)) in enumerate(zip(values, self.pending)):
            if not math.isfinite(value):
                late = f" (losses are read every {self.every} steps: steps {first + i + 1}-{step} ran after it)"
                raise TrainingDiverged(
                    f"loss became {value} at step {first + i} (lr {lr:.3g}){late if first + i < step else ''}; "
                    f"lower lr, raise warmup_steps or keep grad_clip > 0. The last checkpoint "
                    f"({self.checkpoint_dir or 'none'}) was left as it was."
                )
            window.add(value, tokens)
            if first + i != step or not last_is_eval:
                self.logger.log({"step_loss": value, "lr": lr}, step=first + i)
        bar.set_postfix(loss=f"{values[-1]:.3f}", tok_s=f"{window.tokens_per_s:.0f}")
        self.pending.clear()


def fit(model: nn.Module, plan: RunPlan, task: Task, ctx: RunContext | None = None) -> FitResult:
    """Train `model` in place on `task.train_set` as `plan` says and return its history.

    `task.eval_fn(model)` returns metrics (e.g. val loss) every `cfg.eval_every` steps and
    at the end. With `task.checkpoint_dir`, a resumable checkpoint is written every
    `cfg.checkpoint_every` steps and at the end (`save`); `ctx.resume` continues from it.
    `task.finalize(model)` runs once training is over, before the final checkpoint is
    written. `ctx` (None = no logger, no resume, progress bars) brings the logger, resume
    and progress.

    Under `torchrun` (WORLD_SIZE > 1) it trains with DDP: every micro-batch of the plan
    is a global batch, each rank trains on its slice, gradients are averaged; the loss
    and eval metrics are averaged over ranks; only rank 0 logs and writes checkpoints.

    Step losses are read on the host in batches (`LossLog`).
    """
    from tqdm.auto import tqdm

    cfg, dist_ctx, device, steps = plan.cfg, plan.dist, plan.device, plan.steps
    logger: MetricLogger = (ctx.logger if ctx is not None else NullLogger()) if dist_ctx.is_main else NullLogger()
    model.to(device).train()
    if cfg.compile == "auto" and device.type == "cuda" and dist_ctx.is_main:
        choice = "compiled" if plan.compiled else "eager"
        print(
            f"{task.desc}: compile auto -> {choice} ({plan.flops:.1e} planned FLOPs; "
            f"compiles from {COMPILE_MIN_FLOPS:.0e})"
        )
    optimizer, sparse = optim.make_optimizer(model, cfg, device, not dist_ctx.enabled, plan.compiled)
    resume = ctx is not None and ctx.resume and task.checkpoint_dir is not None
    progress = (restore(model, optimizer, plan, task) if resume else None) or Progress()
    if not progress.step:
        set_seed(cfg.seed + dist_ctx.rank)  # distinct dropout masks per rank
    # After resume: DDP broadcasts rank 0's weights to every rank when it wraps.
    run_model = distributed.wrap(
        torch.compile(model, dynamic=plan.dynamic) if plan.compiled else model, dist_ctx, device
    )
    batches = train_batches(plan, task.train_set, progress.micro_batches)

    def evaluate(window: Window | None) -> None:
        row: dict[str, Any] = dict(
            step=progress.step, tokens_seen=progress.tokens, lr=lr_at(max(progress.step - 1, 0), steps, cfg)
        )
        if window is not None:
            row.update(train_loss=window.mean_loss, tokens_per_s=window.tokens_per_s)
        if task.eval_fn is not None:
            optim.flush(optimizer)
            model.eval()
            with torch.no_grad(), autocast(device, plan.dtype):
                row.update(distributed.mean_metrics(task.eval_fn(model), dist_ctx, device))
            model.train()
        row["elapsed_s"] = progress.elapsed_s()
        progress.history.append(row)
        logger.log({k: v for k, v in row.items() if k != "step"}, step=progress.step)

    show = dist_ctx.is_main and (ctx is None or ctx.progress)
    window = Window()
    losses = LossLog(loss_read_every(device), dist_ctx, logger, task.checkpoint_dir)

    def is_eval_step(step: int) -> bool:
        return bool(cfg.eval_every and step % cfg.eval_every == 0) or step == steps

    with (
        sparse,
        tqdm(
            total=steps, initial=progress.step, desc=task.desc, disable=None if show else True, dynamic_ncols=True
        ) as bar,
    ):
        while progress.step < steps:
            lr = lr_at(progress.step, steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, tokens, examples = train_step(run_model, batches, task.loss_fn, plan)
            if cfg.grad_clip > 0:
                optim.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.advance(tokens, examples, cfg.grad_accum_steps)
            losses.add(loss, lr, tokens)
            bar.update(1)
            eval_now = is_eval_step(progress.step)
            checkpoint_now = cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0
            # Read the losses (a host sync) before any eval, checkpoint or end, so a
            # diverged run stops before writing anything, and every `losses.every` steps.
            if eval_now or checkpoint_now or losses.due():
                losses.read(progress.step, window, bar, last_is_eval=eval_now)
            if eval_now:
                evaluate(window)
                window = Window()
            if checkpoint_now and progress.step != steps:
                save(model, plan, task, progress, optimizer, final=False)
    if not progress.history:  # resumed a finished run
        evaluate(None)
    wall = progress.elapsed_s()
    if task.finalize is not None:
        task.finalize(model)
    save(model, plan, task, progress, optimizer, final=True)
    return replace(progress.result(wall), compiled=plan.compiled)

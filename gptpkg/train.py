"""The one training loop, used by pretraining, classifier and instruction fine-tuning.

`fit` owns: AdamW (decay on matrices only, fused; a classifier's untied token embedding
on CPU gets row-sparse gradients and `optim.RowSparseAdamW`), linear warmup + cosine decay,
gradient accumulation and clipping, bf16 autocast and `torch.compile` on CUDA, periodic
eval, progress with tokens/s, atomic checkpoints and resume, and a loud stop on a
non-finite loss. What differs between trainings is the loss and the eval, passed in.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed
from . import optim
from .config import TrainConfig
from .data import IGNORE_INDEX
from .loggers import MetricLogger, NullLogger
from .errors import GptpkgError

# A loss function maps (model, batch) to (mean loss, number of tokens in the batch).
LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, int]]
EvalFn = Callable[[nn.Module], dict[str, float]]
# A batch plan maps an epoch number to that epoch's list of micro-batches (index lists).
BatchPlan = Callable[[int], list[list[int]]]


# History fields that measure the machine, not the model.
TIMING_KEYS = frozenset({"elapsed_s", "tokens_per_s"})


class TrainingDiverged(GptpkgError, RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------
# Losses


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy; targets equal to -100 are ignored. The model computes
    it (`GPT.forward(idx, targets=...)`), so the head and loss can be fused and a DDP
    wrapper sees the call."""
    loss = model(batch["input_ids"], targets=batch["targets"])
    return loss, batch["input_ids"].numel()


def classification_loss(class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy on the logits of each text's pooled token; with `label_smoothing`
    s the target is 1 - s on the label and s spread evenly over all classes."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        logits = _classify(model, batch)  # (B, n_classes)
        w = None if class_weights is None else torch.tensor(class_weights, device=logits.device)
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=w, label_smoothing=label_smoothing)
        return loss, batch["input_ids"].numel()

    return loss_fn


def _classify(model: nn.Module, batch: dict) -> torch.Tensor:
    # Through forward (not .classify) so a DDP / compile wrapper sees the call.
    return model(batch["input_ids"], lengths=batch["lengths"])


# ---------------------------------------------------------------------------------
# Devices, precision, optimizer, schedule


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
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


def should_compile(setting: str, device: torch.device) -> bool:
    setting = str(setting).lower()
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def layer_lr_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """Layer-wise lr decay: id(parameter) -> its lr factor. The embeddings are depth 0,
    block i depth i + 1, the final norm and the head depth n_layers + 1 (factor 1); a
    parameter at depth k trains at decay ** (n_layers + 1 - k). A tied head shares the
    token embedding's factor (the parameter is one)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"lr_layer_decay needs a GPT (a model with .blocks), got {type(model).__name__}")
    top = len(blocks) + 1
    scales: dict[int, float] = {}
    for name in ("tok_emb", "pos_emb"):
        for p in getattr(model, name).parameters():
            scales[id(p)] = decay ** top
    for i, block in enumerate(blocks):
        for p in block.parameters():
            scales[id(p)] = decay ** (top - i - 1)
    for p in model.parameters():
        scales.setdefault(id(p), 1.0)  # final norm, head
    return scales


def param_groups(model: nn.Module, weight_decay: float, exclude: nn.Parameter | None = None,
                 lr_layer_decay: float = 1.0) -> list[dict]:
    """Decay matrices (linear and embedding weights) only; not biases or norms. With
    `lr_layer_decay` < 1, one such pair of groups per depth, each with its `lr_scale`
    (`layer_lr_scales`; `fit` sets a group's lr to the schedule's lr times it)."""
    scales = layer_lr_scales(model, lr_layer_decay) if lr_layer_decay != 1.0 else {}
    seen, groups = {id(exclude)}, {}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = (p.dim() < 2, scales.get(id(p), 1.0))
        groups.setdefault(key, []).append(p)
    out = []
    for scale in sorted({s for _, s in groups} | {1.0}, reverse=True):
        for no_decay in (False, True):
            params = groups.get((no_decay, scale), [])
            if params or scale == 1.0:  # the plain pair is always there (it may be empty)
                group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
                if lr_layer_decay != 1.0:
                    group["lr_scale"] = scale
                out.append(group)
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   row_sparse: nn.Parameter | None = None) -> torch.optim.Optimizer | optim.OptimizerSet:
    """AdamW, fused; with `row_sparse` (the token embedding, trained with sparse
    gradients), that one matrix gets `RowSparseAdamW` (same decay) beside it."""
    dense = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, exclude=row_sparse, lr_layer_decay=cfg.lr_layer_decay),
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        # The fused kernel (one pass over each parameter) exists for CUDA and CPU.
        fused=device.type in ("cuda", "cpu"),
    )
    if row_sparse is None:
        return dense
    group: dict = {"params": [row_sparse]}
    if cfg.lr_layer_decay != 1.0:
        group["lr_scale"] = layer_lr_scales(model, cfg.lr_layer_decay)[id(row_sparse)]
    rows = optim.RowSparseAdamW([group], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return optim.OptimizerSet(dense, rows)


def sparse_embedding(model: nn.Module, cfg: TrainConfig, device: torch.device, distributed_run: bool,
                     compiled: bool) -> nn.Embedding | None:
    """The token embedding to train with row-sparse gradients, or None.

    Only when it pays and is safe: on CPU (measured there; GPUs keep fused dense AdamW),
    in one process (DDP would all-reduce a dense gradient anyway), without
    `torch.compile`, and when the embedding is trainable and not tied to the LM head
    (a tied head's gradient fills every row; a classifier's head is its own).
    """
    emb = getattr(model, "tok_emb", None)
    if cfg.sparse_embedding == "false" or device.type != "cpu" or distributed_run or compiled:
        return None
    if not isinstance(emb, nn.Embedding) or not emb.weight.requires_grad:
        return None
    shared = sum(p is emb.weight for _, p in model.named_parameters(remove_duplicate=False))
    return emb if shared == 1 else None


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


def shuffled_batches(n: int, batch_size: int, seed: int) -> BatchPlan:
    """Each epoch a fresh permutation (seeded by seed + epoch), cut into full batches."""
    if n < batch_size:
        raise ValueError(f"training set has {n} examples, fewer than batch_size={batch_size}")

    def plan(epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]

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


BATCHING = ("bucketed", "shuffled", "pad_longest")


def batch_plan_for(batching: str, lengths: Sequence[int], batch_size: int, seed: int) -> BatchPlan:
    """The plan for a fine-tuning `batching` setting: `bucketed` groups similar lengths;
    `shuffled` and `pad_longest` (the book's: every text padded to the longest in the
    training set, done by the collate) draw random batches."""
    if batching == "bucketed":
        return bucketed_batches(lengths, batch_size, seed)
    if batching in ("shuffled", "pad_longest"):
        return shuffled_batches(len(lengths), batch_size, seed)
    raise ValueError(f"batching must be one of {'|'.join(BATCHING)}, got {batching!r}")


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
            yield from batches[skip:]
            skip = 0
        epoch += 1


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterator[dict] | list[dict], loss_fn: LossFn,
              device: torch.device, max_batches: int = 0, dtype: torch.dtype | None = None) -> float:
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


def batches_of(dataset, collate: Callable, batch_size: int) -> list[dict]:
    """The dataset in order, collated into batches (for eval)."""
    return [collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            for i in range(0, len(dataset), batch_size)]


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

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


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


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def fit(
    model: nn.Module,
    train_set,
    collate: Callable[[list], dict],
    cfg: TrainConfig,
    loss_fn: LossFn = lm_loss,
    eval_fn: EvalFn | None = None,
    batch_plan: BatchPlan | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    logger: MetricLogger | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    finalize: Callable[[nn.Module], None] | None = None,
) -> FitResult:
    """Train `model` in place on `train_set` and return its history.

    `eval_fn(model)` returns metrics (e.g. val loss) every `cfg.eval_every` steps and at
    the end. With `checkpoint_dir`, a resumable checkpoint is written every
    `cfg.checkpoint_every` steps and at the end; `resume=True` continues from it.
    `finalize(model)` runs once training is over, before the final checkpoint is
    written (e.g. a decision rule that training must not see).

    Under `torchrun` (WORLD_SIZE > 1) it trains with DDP: every micro-batch of the plan
    is a global batch, each rank trains on its slice, gradients are averaged; the loss
    and eval metrics are averaged over ranks; only rank 0 logs and writes checkpoints.
    """
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    dist_ctx, device = distributed.setup(device)
    world = dist_ctx.world_size
    logger = (logger or NullLogger()) if dist_ctx.is_main else NullLogger()
    progress = progress and dist_ctx.is_main
    dtype = autocast_dtype(cfg.precision, device)
    model.to(device).train()
    plan = batch_plan or shuffled_batches(len(train_set), cfg.batch_size, cfg.seed)
    steps = total_steps(len(plan(0)), cfg)
    compiled = should_compile(cfg.compile, device)
    emb = sparse_embedding(model, cfg, device, dist_ctx.enabled, compiled)
    optimizer = make_optimizer(model, cfg, device, row_sparse=emb.weight if emb is not None else None)

    step, tokens, examples, history, elapsed0 = 0, 0, 0, [], 0.0
    state = ckpt.load_trainer_state(checkpoint_dir) if (resume and checkpoint_dir) else None
    if state is not None:
        saved, _ = ckpt.load_checkpoint(checkpoint_dir, map_location=device)
        ckpt._unwrap(model).load_state_dict(saved.state_dict())
        optim.load_optimizer_state(optimizer, state["optimizer"])
        step, tokens, examples = int(state["step"]), int(state["tokens"]), int(state["examples"])
        history, elapsed0 = list(state["history"]), float(state["elapsed"])
        torch.set_rng_state(state["rng"])
    else:
        set_seed(cfg.seed + dist_ctx.rank)  # distinct dropout masks per rank

    run_model = torch.compile(model) if compiled else model
    # After resume: DDP broadcasts rank 0's weights to every rank when it wraps.
    run_model = distributed.wrap(run_model, dist_ctx, device)
    micro = _micro_batches(plan, step * cfg.grad_accum_steps)

    def save(final: bool) -> None:
        if checkpoint_dir is None:
            return
        if not dist_ctx.is_main:
            distributed.barrier(dist_ctx)  # wait until rank 0 has written it
            return
        optim.flush(optimizer)
        # The final checkpoint is a pipeline output: leave timings out of it, so the same
        # params and seed give byte-identical files (DVC then skips the stages below).
        elapsed = 0.0 if final else time.perf_counter() - t0 + elapsed0
        kept = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history] if final else history
        ckpt.save_checkpoint(checkpoint_dir, model, meta={**(meta or {}), "step": step, "train": asdict(cfg)},
                             trainer_state={
                                 "step": step, "tokens": tokens, "examples": examples,
                                 "history": kept, "elapsed": elapsed,
                                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                             })
        distributed.barrier(dist_ctx)

    def evaluate(train_loss: float | None, tokens_per_s: float | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step, "tokens_seen": tokens, "lr": lr_at(max(step - 1, 0), steps, cfg)}
        if train_loss is not None:
            row["train_loss"] = train_loss
        if tokens_per_s is not None:
            row["tokens_per_s"] = tokens_per_s
        if eval_fn is not None:
            optim.flush(optimizer)
            was = model.training
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                row.update(distributed.mean_metrics(eval_fn(model), dist_ctx, device))
            model.train(was)
        row["elapsed_s"] = time.perf_counter() - t0 + elapsed0
        history.append(row)
        logger.log({k: v for k, v in row.items() if k != "step"}, step=step)
        return row

    was_sparse = emb.sparse if emb is not None else False
    if emb is not None:
        emb.sparse = True  # its gradient: a sparse tensor over the batch's rows
        watch = optimizer.optimizers[-1].watch(emb)  # rows owe decay until read
    try:
        t0 = time.perf_counter()
        window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
        while step < steps:
            lr = lr_at(step, steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # lr_scale: layer-wise lr decay
            step_loss = torch.zeros((), device=device)
            for k in range(cfg.grad_accum_steps):
                idx = next(micro)
                if dist_ctx.enabled:
                    idx = distributed.shard(idx, dist_ctx)
                batch = to_device(collate([train_set[i] for i in idx]), device)
                # DDP: average gradients across ranks only on the last micro-batch.
                sync = k == cfg.grad_accum_steps - 1 or not dist_ctx.enabled
                with (contextlib.nullcontext() if sync else run_model.no_sync()):
                    with autocast(device, dtype):
                        loss, n_tok = loss_fn(run_model, batch)
                    (loss / cfg.grad_accum_steps).backward()
                step_loss += loss.detach() / cfg.grad_accum_steps
                tokens += n_tok * world  # every rank trains on an equal slice
                window_tokens += n_tok * world
                examples += batch["input_ids"].shape[0] * world
            value = distributed.mean_across_ranks(step_loss, dist_ctx).item()
            if not math.isfinite(value):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"loss became {value} at step {step + 1} (lr {lr:.3g}); lower lr, raise "
                    f"warmup_steps or keep grad_clip > 0. The last checkpoint "
                    f"({checkpoint_dir or 'none'}) was left as it was."
                )
            if cfg.grad_clip > 0:
                optim.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss += value
            window_n += 1
            now = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{window_tokens / max(now - window_t, 1e-9):.0f}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
                evaluate(window_loss / window_n, window_tokens / max(now - window_t, 1e-9))
                window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, time.perf_counter()
            else:  # every optimizer step (W&B); the console logger prints eval rows only
                logger.log({"step_loss": value, "lr": lr}, step=step)
            if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != steps:
                save(final=False)
        bar.close()
    finally:
        optim.flush(optimizer)
        if emb is not None:
            emb.sparse = was_sparse
            watch.remove()
    if not history:  # resumed a finished run
        evaluate(None)
    wall = time.perf_counter() - t0 + elapsed0
    if finalize is not None:
        finalize(model)
    save(final=True)
    return FitResult(steps=step, tokens_seen=tokens, examples_seen=examples, wall_time_s=wall,
                     tokens_per_s=tokens / max(wall, 1e-9), history=history)

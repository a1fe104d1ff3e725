import math
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, Interrupted, dying

from gptpkg import checkpoint as ckpt
from gptpkg.config import ConfigError, TrainConfig, load_params
from gptpkg.data import TokenWindows
from gptpkg.loggers import NullLogger
from gptpkg.model import GPT
from gptpkg.optim import make_optimizer, param_groups
from gptpkg.presets import model_config
from gptpkg.train import (
    Task,
    TrainingDiverged,
    autocast_dtype,
    batches_of,
    fit,
    lm_loss,
    lr_at,
    mean_loss,
    plan_run,
    planned_flops,
    should_compile,
    shuffled_batches,
    total_steps,
)


def quiet(resume=False):
    """What `fit` reads from a StageContext: no logging, no progress bar."""
    return SimpleNamespace(logger=NullLogger(), resume=resume, progress=False)


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def run_fit(model, data, c, batch_plan=None, ctx=None, **task):
    """`fit` on the plan `plan_run` makes from `c` (and `batch_plan`), with a Task of
    `data` and the `task` fields."""
    return fit(model, plan_run(c, model, data, collate, batch_plan), Task(data, **task), ctx)


@pytest.fixture(scope="module")
def verdict_ids(tok, shared_data):
    return tok.encode((shared_data / "the-verdict.txt").read_text())


def tiny_model(seed=123):
    torch.manual_seed(seed)
    return GPT(model_config("tiny"))


def cfg(**kw):
    base = dict(lr=1e-3, warmup_steps=2, epochs=0, max_steps=8, batch_size=4, eval_every=4, seed=7)
    return TrainConfig(**{**base, **kw})


def test_a_few_hundred_steps_lower_the_loss_well_below_its_start(verdict_ids):
    data = TokenWindows(verdict_ids, 32, 32)
    model = tiny_model()
    start = mean_loss(model, batches_of(data, collate, 16), lm_loss, torch.device("cpu"))
    assert abs(start - math.log(50257)) < 0.5  # untrained: about uniform
    result = run_fit(model, data, cfg(max_steps=200, batch_size=2, lr=5e-3, eval_every=0), ctx=quiet())
    end = mean_loss(model, batches_of(data, collate, 16), lm_loss, torch.device("cpu"))
    assert result.steps == 200
    assert end < start - 3.0, (start, end)
    assert result.tokens_seen == 200 * 2 * 32


def test_same_seed_same_losses(verdict_ids):
    data = TokenWindows(verdict_ids, 16, 16)
    runs = [run_fit(tiny_model(), data, cfg(), ctx=quiet()).history for _ in range(2)]
    assert [r["train_loss"] for r in runs[0]] == [r["train_loss"] for r in runs[1]]
    other = run_fit(tiny_model(), data, cfg(seed=8), ctx=quiet()).history
    assert [r["train_loss"] for r in other] != [r["train_loss"] for r in runs[0]]


def test_resume_continues_from_the_saved_step_with_the_same_optimizer_state(verdict_ids, tmp_path):
    data = TokenWindows(verdict_ids, 16, 16)
    full = tiny_model()
    ref = run_fit(full, data, cfg(max_steps=10, eval_every=5), ctx=quiet())

    # an interrupted run: same schedule, checkpoint every 5 steps, killed during step 7
    with pytest.raises(Interrupted):
        run_fit(
            tiny_model(),
            data,
            cfg(max_steps=10, eval_every=5, checkpoint_every=5),
            loss_fn=dying(lm_loss, 7),
            checkpoint_dir=tmp_path / "ck",
            ctx=quiet(),
        )
    state = ckpt.load_trainer_state(tmp_path / "ck")
    assert state["step"] == 5 and state["optimizer"]["state"]

    # fit refuses to continue it under other training params, and leaves it as it was
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"--resume: .* other values for \['lr', 'max_steps'\]"):
        run_fit(
            tiny_model(),
            data,
            cfg(max_steps=12, eval_every=5, checkpoint_every=5, lr=2e-3),
            checkpoint_dir=tmp_path / "ck",
            ctx=quiet(resume=True),
        )
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before

    resumed = tiny_model(seed=999)  # weights are replaced by the checkpoint's
    out = run_fit(
        resumed,
        data,
        cfg(max_steps=10, eval_every=5, checkpoint_every=5),
        checkpoint_dir=tmp_path / "ck",
        ctx=quiet(resume=True),
    )
    assert out.steps == 10
    assert [r["step"] for r in out.history] == [5, 10]
    assert out.history[-1]["train_loss"] == pytest.approx(ref.history[-1]["train_loss"], abs=1e-6)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    # the resumed optimizer kept its moments: step counts continue from 5
    opt_state = ckpt.load_trainer_state(tmp_path / "ck")["optimizer"]["state"]
    assert int(next(iter(opt_state.values()))["step"]) == 10


def test_checkpoint_every_n_steps(verdict_ids, tmp_path, monkeypatch):
    data = TokenWindows(verdict_ids, 16, 16)
    seen = []
    real = ckpt.save_checkpoint

    def spy(target, model, meta=None, trainer_state=None):
        seen.append(trainer_state["step"])
        return real(target, model, meta, trainer_state)

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    run_fit(tiny_model(), data, cfg(max_steps=7, checkpoint_every=3), checkpoint_dir=tmp_path / "c", ctx=quiet())
    assert seen == [3, 6, 7]
    model, config = ckpt.load_checkpoint(tmp_path / "c")
    assert config["meta"]["step"] == 7
    # the checkpoint records the training params `--resume` compares
    assert config["meta"]["params"] == cfg(max_steps=7, checkpoint_every=3).training_params()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(verdict_ids, tmp_path):
    data = TokenWindows(verdict_ids, 16, 16)
    model = tiny_model()
    run_fit(model, data, cfg(max_steps=2), checkpoint_dir=tmp_path / "ck", ctx=quiet())
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def nan_loss(m, batch):
        loss, n = lm_loss(m, batch)
        return loss * float("nan"), n

    with pytest.raises(TrainingDiverged, match="loss became nan at step 1"):
        run_fit(tiny_model(), data, cfg(max_steps=4), loss_fn=nan_loss, checkpoint_dir=tmp_path / "ck", ctx=quiet())
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


class StepLog(NullLogger):
    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append((step, metrics))


def test_reading_the_loss_every_few_steps_trains_the_same_weights(verdict_ids, monkeypatch):
    """Losses read on the host every 4 steps (as on CUDA) instead of every step: the same
    weights bit for bit, the same eval rows, and every step's loss still logged in order."""
    from gptpkg import train

    data = TokenWindows(verdict_ids, 16, 16)
    runs = {}
    for every in (1, 4):
        monkeypatch.setitem(train.LOSS_READ_EVERY, "cpu", every)
        model, log = tiny_model(), StepLog()
        result = run_fit(
            model,
            data,
            cfg(max_steps=11, eval_every=5),
            ctx=SimpleNamespace(logger=log, resume=False, progress=False),
        )
        runs[every] = (model.state_dict(), result.history, log.rows)
    (w1, h1, rows1), (w4, h4, rows4) = runs[1], runs[4]
    assert all(torch.equal(w1[k], w4[k]) for k in w1)
    drop = lambda h: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in h]  # noqa: E731
    assert drop(h1) == drop(h4) and [r["step"] for r in h4] == [5, 10, 11]
    assert [step for step, _ in rows4] == [step for step, _ in rows1] == list(range(1, 12))
    assert [r for r in rows1 if "step_loss" in r[1]] == [r for r in rows4 if "step_loss" in r[1]]


def test_a_nan_loss_read_late_names_the_step_it_came_at(verdict_ids, tmp_path, monkeypatch):
    from gptpkg import train

    monkeypatch.setitem(train.LOSS_READ_EVERY, "cpu", 4)
    data = TokenWindows(verdict_ids, 16, 16)
    calls = {"n": 0}

    def nan_from_step_2(m, batch):
        calls["n"] += 1
        loss, n = lm_loss(m, batch)
        return (loss * float("nan") if calls["n"] >= 2 else loss), n

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 2 .*steps 3-4 ran after it"):
        run_fit(
            tiny_model(),
            data,
            cfg(max_steps=8, eval_every=0, checkpoint_every=6),
            loss_fn=nan_from_step_2,
            checkpoint_dir=tmp_path / "ck",
            ctx=quiet(),
        )
    assert not (tmp_path / "ck").exists()  # stopped at the first read, before any checkpoint


def test_gradient_accumulation_matches_a_larger_batch(verdict_ids):
    data = TokenWindows(verdict_ids, 16, 16)
    a, b = tiny_model(), tiny_model()
    plan = shuffled_batches(len(data), 8, 7)
    run_fit(a, data, cfg(batch_size=8, max_steps=3, grad_clip=0), batch_plan=plan, ctx=quiet())

    def halves(epoch):  # the same 8-example batches, each split in two micro-batches
        return [half for batch in plan(epoch) for half in (batch[:4], batch[4:])]

    run_fit(
        b,
        data,
        cfg(batch_size=4, grad_accum_steps=2, max_steps=3, grad_clip=0),
        batch_plan=halves,
        ctx=quiet(),
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4)


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=110, epochs=0)
    assert lr_at(0, 110, c) == pytest.approx(0.1)
    assert lr_at(9, 110, c) == pytest.approx(1.0)
    assert lr_at(10, 110, c) == pytest.approx(1.0)
    assert lr_at(60, 110, c) == pytest.approx(0.55)
    assert lr_at(110, 110, c) == pytest.approx(0.1)
    assert all(lr_at(s, 110, c) >= lr_at(s + 1, 110, c) for s in range(10, 110))


def test_weight_decay_on_matrices_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # the tied head is counted once
    opt, _ = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)  # a tied embedding is never row-sparse
    assert opt.defaults.get("fused")  # fused kernel on CPU and CUDA


def test_gpu_switches_resolve_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None
    assert should_compile(True, cpu) and not should_compile(False, cuda)
    assert not should_compile("auto", cpu, math.inf)


def test_compile_auto_compiles_only_the_long_cuda_trainings():
    """`compile: auto` on CUDA: the default stages and the gpt2-small fine-tunings train
    eager (compiling costs more than it saves there), the gpt2-small pretraining compiled.
    Step counts: the default pretraining's 824 (8 epochs of 103 windows), the gpt2-small
    profile's ~1,000 pretraining steps and 612 spam fine-tuning steps."""
    cuda = torch.device("cuda")
    default, small = load_params(ROOT / "params.yaml"), load_params(ROOT / "params.yaml", profile="gpt2-small")
    with torch.device("meta"):
        mini_model, small_model = GPT(default.pretrain.architecture()), GPT(small.pretrain.architecture())
    assert not should_compile("auto", cuda, planned_flops(mini_model, 824, default.pretrain))
    assert not should_compile("auto", cuda, planned_flops(mini_model, 1000, default.finetune_spam))
    assert not should_compile("auto", cuda, planned_flops(small_model, 612, small.finetune_spam))
    assert not should_compile("auto", cuda, planned_flops(small_model, 234, small.finetune_instruct))
    assert should_compile("auto", cuda, planned_flops(small_model, 1000, small.pretrain))


def test_bf16_autocast_trains_on_cpu(verdict_ids):
    data = TokenWindows(verdict_ids, 16, 16)
    out = run_fit(tiny_model(), data, cfg(precision="bf16", max_steps=3), ctx=quiet())
    assert math.isfinite(out.history[-1]["train_loss"])


def test_total_steps_from_epochs_and_cap():
    assert total_steps(10, TrainConfig(epochs=2.5, batch_size=1)) == 25
    assert total_steps(10, TrainConfig(epochs=2.5, max_steps=7, batch_size=1)) == 7
    assert total_steps(10, TrainConfig(epochs=1, grad_accum_steps=3, batch_size=1)) == 3
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        shuffled_batches(5, 8, 0)


def test_final_checkpoint_is_byte_identical_for_the_same_seed(verdict_ids, tmp_path):
    """Timings stay out of the final checkpoint, so DVC sees the same output hash."""
    data = TokenWindows(verdict_ids, 16, 16)
    for name in ("a", "b"):
        run_fit(tiny_model(), data, cfg(max_steps=4, eval_every=2), checkpoint_dir=tmp_path / name, ctx=quiet())
    for f in ("model.safetensors", "config.json", "trainer.pt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f

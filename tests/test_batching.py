"""Length-bucketed batch plans for fine-tuning, and their wiring into the stages."""

from __future__ import annotations

import math
import random
from functools import partial
from statistics import mean
from types import SimpleNamespace

import pytest
from helpers import params_in

from gptpkg.config import ConfigError, TrainConfig
from gptpkg.data import classification_collate, instruction_collate
from gptpkg.finetune import LENGTH_MULTIPLE, finetune_plan
from gptpkg.loggers import NullLogger
from gptpkg.train import Task, batch_plan_for, bucketed_batches, plan_run, shuffled_batches

_rng = random.Random(0)
LENGTHS = [_rng.randint(3, 120) for _ in range(1000)]


def _padding_waste(plan, lengths):
    """Fraction of padded positions when each batch pads to its longest text."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    return 1 - sum(lengths) / padded


def test_bucketed_plan_covers_every_example_once_per_epoch():
    plan = bucketed_batches(LENGTHS, 8, seed=3)
    for epoch in range(3):
        batches = plan(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(LENGTHS)))
        assert all(1 <= len(b) <= 8 for b in batches)


def test_bucketed_plan_is_seeded_and_a_function_of_the_epoch():
    a, b = bucketed_batches(LENGTHS, 8, seed=3), bucketed_batches(LENGTHS, 8, seed=3)
    assert a(0) == b(0) and a(1) == b(1)  # same seed, same epoch: same order (resume)
    assert a(0) != a(1)  # a new order every epoch
    assert a(0) != bucketed_batches(LENGTHS, 8, seed=4)(0)


def test_bucketed_plan_groups_lengths_and_cuts_padding():
    bucketed = bucketed_batches(LENGTHS, 8, seed=3)(0)
    shuffled = shuffled_batches(len(LENGTHS), 8, seed=3)(0)

    def spread(plan):
        return mean(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in plan)

    assert spread(bucketed) < 0.1 * spread(shuffled)
    assert _padding_waste(bucketed, LENGTHS) < 0.05 < 0.3 < _padding_waste(shuffled, LENGTHS)
    # the batch order is shuffled, not sorted by length
    firsts = [LENGTHS[b[0]] for b in bucketed]
    assert firsts != sorted(firsts)


def _tiny_model():
    from gptpkg.model import GPT
    from gptpkg.presets import model_config

    return GPT(model_config("tiny"))


def _items(lengths):
    return [{"input_ids": [1] * n, "label": 0, "prompt_len": 1} for n in lengths]


def batching(cfg, lengths, collate):
    """(batch plan, collate) of the fine-tuning plan for items of these lengths."""
    plan = finetune_plan(cfg, _tiny_model(), _items(lengths), collate)
    return plan.batches, plan.collate


def test_batching_settings_and_errors(tmp_path):
    lengths = [5, 9, 2, 7, 3, 11, 4, 8]
    sets = ["finetune_spam.batch_size=4", "finetune_instruct.batch_size=4"]
    pad = params_in(tmp_path, *sets, "finetune_spam.batching=pad_longest", "finetune_instruct.batching=pad_longest")
    plan, collate = batching(pad.finetune_spam, lengths, classification_collate)
    batch = collate([{"input_ids": [1] * 3, "label": 0}, {"input_ids": [1] * 5, "label": 1}])
    assert batch["input_ids"].shape == (2, 11)  # padded to the longest training text
    assert batch["lengths"].tolist() == [3, 5]
    assert plan(0) == shuffled_batches(len(lengths), 4, pad.finetune_spam.seed)(0)  # random batches of 4
    assert plan(0) == batch_plan_for("shuffled", lengths, 4, pad.finetune_spam.seed)(0)
    bucketed = params_in(tmp_path, *sets, "finetune_spam.batching=bucketed").finetune_spam
    plan, collate = batching(bucketed, lengths, classification_collate)
    assert collate is classification_collate
    assert plan(0) == bucketed_batches(lengths, 4, bucketed.seed)(0)
    # instructions: every batch as long as the longest example (+1 end token), targets masked
    _, collate = batching(pad.finetune_instruct, lengths, instruction_collate)
    batch = collate([{"input_ids": [1] * 3, "prompt_len": 2}, {"input_ids": [1] * 5, "prompt_len": 2}])
    assert batch["input_ids"].shape == (2, 11)
    assert (batch["targets"][0, 3:] == -100).all() and (batch["targets"][0, :3] != -100).all()
    for section in ("finetune_instruct", "finetune_spam"):
        with pytest.raises(ConfigError, match=f"params.{section}.batching: expected bucketed\\|shuffled\\|pad_longest"):
            params_in(tmp_path, f"{section}.batching=sorted")


def test_the_padding_to_a_length_multiple_follows_the_plans_compile_decision(tmp_path):
    """The fine-tunings pad batch lengths to LENGTH_MULTIPLE exactly when their run plan
    compiles; the plan makes the compile decision once (here on CPU: compile true pads,
    auto and false do not)."""
    lengths = [5, 9, 2, 7, 3, 11, 4, 8]
    items = [{"input_ids": [1] * 3, "label": 0}, {"input_ids": [1] * 5, "label": 1}]
    for setting, compiled in (("true", True), ("auto", False), ("false", False)):
        cfg = params_in(tmp_path, "finetune_spam.batch_size=4", f"finetune_spam.compile={setting}").finetune_spam
        plan = finetune_plan(cfg, _tiny_model(), _items(lengths), classification_collate)
        assert plan.compiled is compiled and plan.dynamic is True
        assert plan.collate(items)["input_ids"].shape == (2, LENGTH_MULTIPLE if compiled else 5)
        assert plan.steps == math.ceil(cfg.epochs * len(plan.batches(0)))  # one micro-batch a step


def test_fit_with_a_bucketed_plan_resumes_to_the_same_weights(tmp_path):
    import torch

    from gptpkg.model import GPT, GPTClassifier
    from gptpkg.presets import model_config
    from gptpkg.train import classification_loss, fit

    rng = random.Random(1)
    data = [{"input_ids": [rng.randrange(500) for _ in range(rng.randint(2, 30))], "label": i % 2} for i in range(40)]
    cfg = TrainConfig(
        lr=1e-3, epochs=1.0, max_steps=6, batch_size=4, checkpoint_every=2, eval_every=0, device="cpu", compile=False
    )
    quiet = SimpleNamespace(logger=NullLogger(), resume=False, progress=False)
    plan = bucketed_batches([len(d["input_ids"]) for d in data], 4, seed=5)
    collate = partial(classification_collate, pad_id=0)  # the tiny test vocabulary has no 50256

    def model():
        torch.manual_seed(0)
        return GPTClassifier(GPT(model_config("tiny", vocab_size=500, drop_rate=0.0)), 2)

    def run(m, loss_fn, ctx, checkpoint_dir=None):
        return fit(m, plan_run(cfg, m, data, collate, plan), Task(data, loss_fn, checkpoint_dir=checkpoint_dir), ctx)

    straight = model()
    run(straight, classification_loss(), quiet)

    calls = {"n": 0}
    base_loss = classification_loss()

    def crash_after_three_steps(m, batch):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated crash")
        return base_loss(m, batch)

    with pytest.raises(KeyboardInterrupt):
        run(model(), crash_after_three_steps, quiet, tmp_path / "ck")
    resumed = model()
    r = run(resumed, base_loss, SimpleNamespace(logger=NullLogger(), resume=True, progress=False), tmp_path / "ck")
    assert r.steps == 6 and r.examples_seen == sum(len(b) for b in (plan(0) + plan(1))[:6])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

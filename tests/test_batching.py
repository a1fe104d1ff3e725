"""Length-bucketed batch plans for fine-tuning, and their wiring into the stages."""

from __future__ import annotations

import random
from statistics import mean

import pytest

from gptpkg.config import ConfigError, TrainConfig
from gptpkg.finetune import _batching
from gptpkg.train import batch_plan_for, bucketed_batches, shuffled_batches
from gptpkg.data import classification_collate

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
    spread = lambda plan: mean(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in plan)
    assert spread(bucketed) < 0.1 * spread(shuffled)
    assert _padding_waste(bucketed, LENGTHS) < 0.05 < 0.3 < _padding_waste(shuffled, LENGTHS)
    # the batch order is shuffled, not sorted by length
    firsts = [LENGTHS[b[0]] for b in bucketed]
    assert firsts != sorted(firsts)


def test_batching_settings_and_errors():
    cfg = TrainConfig(batch_size=4)
    lengths = [5, 9, 2, 7, 3, 11, 4, 8]
    plan, collate = _batching("pad_longest", "finetune_spam", lengths, cfg, classification_collate)
    batch = collate([{"input_ids": [1] * 3, "label": 0}, {"input_ids": [1] * 5, "label": 1}])
    assert batch["input_ids"].shape == (2, 11)  # padded to the longest training text
    assert batch["lengths"].tolist() == [3, 5]
    _, collate = _batching("bucketed", "finetune_spam", lengths, cfg, classification_collate)
    assert collate is classification_collate
    with pytest.raises(ConfigError, match="finetune_instruct.batching"):
        _batching("pad_longest", "finetune_instruct", lengths, cfg, None)
    with pytest.raises(ValueError, match="batching must be one of"):
        batch_plan_for("sorted", lengths, 4, 0)

"""finetune_spam.soup: n fine-tunings of one start model averaged into the classifier.
Real tiny runs of the stage on a handful of real messages (the `handful` fixture of
test_cv.py), real checkpoints, an interrupted soup resumed. A bad `soup` value: in
test_cv.py's bad-setting test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptpkg.checkpoint import load_checkpoint, read_config
from gptpkg.config import ConfigError, model_config
from gptpkg.finetune import average_weights, soup_workdir
from gptpkg.model import GPT
from helpers import Interrupted, dying
from test_cv import handful, prepared  # noqa: F401  (fixtures)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder)[0].state_dict()


def test_average_weights_is_the_elementwise_mean():
    torch.manual_seed(0)
    a, b, c = (GPT(model_config("tiny")).to_classifier(2) for _ in range(3))
    target = GPT(model_config("tiny")).to_classifier(2)
    average_weights(target, [a, b, c])
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, (a.state_dict()[k] + b.state_dict()[k] + c.state_dict()[k]) / 3, msg=k)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    average_weights(a, [a, b])  # a member may be the target: every member is read first
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, (before[k] + b.state_dict()[k]) / 2, msg=k)


def test_a_soup_is_the_mean_of_its_members_each_a_plain_fine_tuning(handful, monkeypatch):
    """soup=2 writes the mean of two fine-tunings from one start (seeds 123 and 124);
    member 1 is exactly the soup=1 run; the member checkpoints are removed afterwards."""
    import gptpkg.finetune as ft
    from gptpkg.runner import run_stage

    params, _ = handful
    run_stage("finetune_spam", params("one", soup=1), progress=False)
    p = params("soup", soup=2)
    out = Path(p["paths"]["spam_classifier"])
    work = soup_workdir(out)
    kept = {}
    real_rmtree = ft.shutil.rmtree

    def keep_members(path, **kw):  # read the members before they go, then remove them
        kept.update({m.name: (_weights(m), read_config(m)["meta"]["train"]["seed"]) for m in sorted(Path(path).iterdir())})
        real_rmtree(path, **kw)

    monkeypatch.setattr(ft.shutil, "rmtree", keep_members)
    run_stage("finetune_spam", p, progress=False)
    assert not work.exists()
    assert sorted(kept) == ["member-1", "member-2"]
    (w1, s1), (w2, s2) = kept["member-1"], kept["member-2"]
    assert (s1, s2) == (123, 124)
    soup = _weights(out)
    one = _weights(Path(params("one")["paths"]["spam_classifier"]))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # two different fine-tunings
    for k in soup:
        torch.testing.assert_close(one[k], w1[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(soup[k], (w1[k] + w2[k]) / 2, msg=k)
    meta = read_config(out)["meta"]
    assert meta["soup"] == {"members": 2, "seeds": [123, 124]} and meta["train"]["seed"] == 123
    metrics = json.loads((Path(p["paths"]["metrics"]) / "finetune_spam.json").read_text())
    assert metrics["steps"] == 3  # each member's schedule (max_steps=3), as in the history


def test_an_interrupted_soup_resumes_to_the_uninterrupted_soup(handful, monkeypatch):
    import gptpkg.finetune as ft
    from gptpkg.runner import run_stage

    params, _ = handful
    run_stage("finetune_spam", params("full", soup=2), progress=False)
    p = params("cut", soup=2, checkpoint_every=1)
    out = Path(p["paths"]["spam_classifier"])
    real = ft.classification_loss
    # member 1: 3 training calls + 1 val eval; member 2 dies in its 2nd step (after step 1's checkpoint)
    monkeypatch.setattr(ft, "classification_loss", lambda *a: dying(real(*a), 6))
    with pytest.raises(Interrupted):
        run_stage("finetune_spam", p, progress=False)
    monkeypatch.setattr(ft, "classification_loss", real)
    work = soup_workdir(out)
    assert sorted(d.name for d in work.iterdir()) == ["member-1", "member-2"]
    assert not (out / "config.json").exists()  # no classifier written before the soup is complete
    # resuming with another seed would continue members trained for other seeds: refused
    with pytest.raises(ConfigError, match=r"member-1 was trained with other params.finetune_spam values for \['seed'\]"):
        run_stage("finetune_spam", params("cut", soup=2, checkpoint_every=1, seed=7), resume=True, progress=False)
    # so would other stage keys that shape the training (not TrainConfig's)
    with pytest.raises(ConfigError, match=r"member-1 was trained with other params.finetune_spam values for \['pooling'\]"):
        run_stage("finetune_spam", params("cut", soup=2, checkpoint_every=1, pooling="mean"), resume=True,
                  progress=False)
    run_stage("finetune_spam", p, resume=True, progress=False)
    assert not work.exists()
    full = _weights(Path(params("full")["paths"]["spam_classifier"]))
    for k, v in _weights(out).items():
        torch.testing.assert_close(v, full[k], msg=k)


def test_resuming_a_finished_soup_trains_nothing(handful, monkeypatch):
    """--resume of a finished soup: the classifier and its files stay as they are, the
    metrics come out the same, and no member is fine-tuned again; a new
    decision_spam_share (it acts after training) only resets the logit offset."""
    import gptpkg.finetune as ft
    from gptpkg.runner import run_stage

    params, _ = handful
    p = params("done", soup=2)
    out = Path(p["paths"]["spam_classifier"])
    metrics_file = Path(p["paths"]["metrics"]) / "finetune_spam.json"
    run_stage("finetune_spam", p, progress=False)
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    trained = _weights(out)
    assert "trainer.pt" in files  # the finished soup's summary, for --resume
    first = json.loads(metrics_file.read_text())

    def no_training(*a, **kw):
        raise AssertionError("a finished soup was fine-tuned again")

    monkeypatch.setattr(ft, "fit", no_training)
    run_stage("finetune_spam", p, resume=True, progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files
    assert not soup_workdir(out).exists()
    again = json.loads(metrics_file.read_text())
    timing = {"wall_time_s", "examples_per_s", "stage_wall_time_s", "stage_cpu_time_s"}
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}

    run_stage("finetune_spam", params("done", soup=2, decision_spam_share=0.2), resume=True, progress=False)
    config = read_config(out)
    assert config["logit_offset"][1] < json.loads(files["config.json"])["logit_offset"][1]  # a lower spam prior
    for k, v in _weights(out).items():  # the same weights, only the decision moved
        assert torch.equal(v, trained[k]), k
    monkeypatch.undo()
    run_stage("finetune_spam", p, progress=False)  # a plain rerun retrains: the same files, byte for byte
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files

"""finetune_spam.soup: n fine-tunings of one start model averaged into the classifier.
Real tiny runs of the stage on a handful of real messages (the `handful` fixture of
test_cv.py), real checkpoints, an interrupted soup resumed. A bad `soup` value: in
test_cv.py's bad-setting test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Interrupted, dying
from test_cv import handful, prepared  # noqa: F401  (fixtures)

from gptpkg.checkpoint import load_checkpoint, read_config
from gptpkg.config import ConfigError
from gptpkg.model import GPT, GPTClassifier
from gptpkg.presets import model_config
from gptpkg.stages.finetune_spam import average_weights, soup_workdir


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder)[0].state_dict()


def test_average_weights_is_the_elementwise_mean():
    torch.manual_seed(0)
    a, b, c = (GPTClassifier(GPT(model_config("tiny")), 2) for _ in range(3))
    target = GPTClassifier(GPT(model_config("tiny")), 2)
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
    import gptpkg.stages.finetune_spam as clf
    from gptpkg.runner import run_stage

    params, _ = handful
    run_stage("finetune_spam", params("one", soup=1), progress=False)
    p = params("soup", soup=2)
    out = Path(p.paths.spam_classifier)
    work = soup_workdir(out)
    kept = {}
    real_rmtree = clf.shutil.rmtree

    def keep_members(path, **kw):  # read the members before they go, then remove them
        kept.update(
            {m.name: (_weights(m), read_config(m)["meta"]["params"]["seed"]) for m in sorted(Path(path).iterdir())}
        )
        real_rmtree(path, **kw)

    monkeypatch.setattr(clf.shutil, "rmtree", keep_members)
    saves, real_save = [], clf.save

    def record_save(model, plan, task, progress, *a, **extra_meta):  # the one save `fit` uses too
        saves.append((Path(task.checkpoint_dir), extra_meta))
        return real_save(model, plan, task, progress, *a, **extra_meta)

    monkeypatch.setattr(clf, "save", record_save)
    run_stage("finetune_spam", p, progress=False)
    assert saves == [(out, {"soup": [123, 124]})]
    assert not work.exists()
    assert sorted(kept) == ["member-1", "member-2"]
    (w1, s1), (w2, s2) = kept["member-1"], kept["member-2"]
    assert (s1, s2) == (123, 124)
    soup = _weights(out)
    one = _weights(Path(params("one").paths.spam_classifier))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # two different fine-tunings
    for k in soup:
        torch.testing.assert_close(one[k], w1[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(soup[k], (w1[k] + w2[k]) / 2, msg=k)
    meta = read_config(out)["meta"]
    assert meta["soup"] == [123, 124] and meta["params"]["seed"] == 123 and meta["params"]["soup"] == 2
    metrics = json.loads((Path(p.paths.metrics) / "finetune_spam.json").read_text())
    assert metrics["steps"] == 3  # each member's schedule (max_steps=3), as in the history


def test_an_interrupted_soup_resumes_to_the_uninterrupted_soup(handful, monkeypatch):
    """A soup killed in its second member: --resume refuses other training params, then
    keeps the finished member, continues member 2 from its last checkpoint (only the
    steps after it are trained) and writes the uninterrupted soup's weights."""
    import gptpkg.stages.finetune_spam as clf
    from gptpkg.runner import run_stage

    params, _ = handful
    run_stage("finetune_spam", params("full", soup=2), progress=False)
    p = params("cut", soup=2, checkpoint_every=1)
    out = Path(p.paths.spam_classifier)
    real = clf.classification_loss
    # the training loss of both members (max_steps=3 each; the stage's val loss has its
    # own counter, called once): member 2 dies in its 2nd step (the 5th call), after the
    # checkpoint of its step 1
    monkeypatch.setattr(clf, "classification_loss", lambda *a: dying(real(*a), 5))
    with pytest.raises(Interrupted):
        run_stage("finetune_spam", p, progress=False)
    work = soup_workdir(out)
    assert sorted(d.name for d in work.iterdir()) == ["member-1", "member-2"]
    assert read_config(work / "member-1")["meta"]["step"] == 3 and read_config(work / "member-2")["meta"]["step"] == 1
    assert not (out / "config.json").exists()  # no classifier written before the soup is complete
    # resuming with another seed would continue members trained for other seeds: refused
    with pytest.raises(ConfigError, match=r"--resume: .*member-1 was trained with other values for \['seed'\]"):
        run_stage("finetune_spam", params("cut", soup=2, checkpoint_every=1, seed=7), resume=True, progress=False)
    # so would other stage keys that shape the training (not TrainConfig's)
    with pytest.raises(
        ConfigError, match=r"--resume: .*member-1 was trained with other values for \['class_weights'\]"
    ):
        run_stage(
            "finetune_spam",
            params("cut", "finetune_spam.class_weights=[1.0, 2.0]", soup=2, checkpoint_every=1),
            resume=True,
            progress=False,
        )
    assert sorted(d.name for d in work.iterdir()) == ["member-1", "member-2"]  # the refusals changed nothing
    calls = {"n": 0}

    def counted(*a):
        loss = real(*a)

        def count(model, batch):
            calls["n"] += 1
            return loss(model, batch)

        return count

    monkeypatch.setattr(clf, "classification_loss", counted)
    run_stage("finetune_spam", p, resume=True, progress=False)
    assert calls["n"] == 2  # member 1 done (no eval again); member 2 from its step-1 checkpoint: steps 2 and 3
    assert not work.exists()
    full = _weights(Path(params("full").paths.spam_classifier))
    for k, v in _weights(out).items():
        torch.testing.assert_close(v, full[k], msg=k)

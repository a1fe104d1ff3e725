"""finetune_spam.decision_spam_share: the classifier decides for a given spam share by a
spam-logit offset set after training (`GPTClassifier.set_logit_offset`,
`classifier.decision_offset`).
Real tiny runs of the stage on the `handful` messages of test_cv.py, real checkpoints, the
real ONNX export. A bad value: in test_cv.py's bad-setting test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_cv import handful, prepared  # noqa: F401  (fixtures)

from gptpkg.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, read_config, save_checkpoint
from gptpkg.model import GPT, GPTClassifier
from gptpkg.presets import model_config
from gptpkg.stages.finetune_spam import decision_offset


def test_decision_offset_is_the_prior_shift_from_the_weighted_training_mix():
    labels = [0] * 90 + [1] * 10
    # weights [1, 3]: the model trained on 30 weighted spam to 90 ham (25%); at 50% the
    # spam odds grow by 90/30 = 3
    assert decision_offset(labels, [1.0, 3.0], 0.5) == pytest.approx(math.log(3.0))
    assert decision_offset(labels, None, 0.5) == pytest.approx(math.log(9.0))
    assert decision_offset(labels, [1.0, 3.0], 0.25) == pytest.approx(0.0, abs=1e-12)
    # toward ham for traffic with less spam than the training mix
    assert decision_offset(labels, [1.0, 3.0], 0.1) == pytest.approx(math.log(1 / 9) - math.log(1 / 3))
    with pytest.raises(ValueError, match="need both classes"):
        decision_offset([0, 0, 0], [1.0, 3.0], 0.5)


def test_logit_offset_shifts_every_classify_result_and_nothing_else():
    torch.manual_seed(0)
    model = GPTClassifier(GPT(model_config("tiny")), 2).eval()
    ids = torch.randint(0, 50257, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    before = model(ids, lengths)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_logit_offset([0.0, 1.5])
    model.set_logit_offset([0.0, 1.5])  # setting, not adding: idempotent
    torch.testing.assert_close(model(ids, lengths), before + torch.tensor([0.0, 1.5]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no weight changed
    model.set_logit_offset(None)
    torch.testing.assert_close(model(ids, lengths), before)
    with pytest.raises(ValueError, match=r"expected 2 values \(one per class\)"):
        model.set_logit_offset([1.0])
    with pytest.raises(ValueError, match="expected finite numbers"):
        model.set_logit_offset([0.0, float("inf")])
    # the decision rule belongs to the classifier: the language model has none
    lm = GPT(model_config("tiny"))
    assert not hasattr(lm, "set_logit_offset") and not hasattr(lm, "logit_offset")


def test_a_checkpoint_keeps_the_offset_and_a_bad_one_is_named(tmp_path):
    torch.manual_seed(0)
    model = GPTClassifier(GPT(model_config("tiny")), 2)
    model.set_logit_offset([0.0, -0.75])
    save_checkpoint(tmp_path / "clf", model, {"labels": ["ham", "spam"]})
    assert load_checkpoint(tmp_path / "clf")[0].logit_offset == (0.0, -0.75)
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    config["logit_offset"] = [0.0, 1.0, 2.0]
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: logit_offset: expected 2 values"):
        load_checkpoint(tmp_path / "clf")


@pytest.mark.parametrize("soup", [1, 2])
def test_the_stage_trains_as_without_it_and_then_decides_for_the_share(handful, soup):
    """Same weights as the run without the key (training never sees the offset); the
    written classifier holds the offset of its training messages; the soup=1 checkpoint
    keeps its trainer state, so --resume of the finished run gives the same file."""
    from gptpkg.runner import run_stage

    params, parts = handful
    run_stage("finetune_spam", params("plain", soup=soup, decision_spam_share="null"), progress=False)
    p = params("balanced", soup=soup, decision_spam_share=0.5)
    metrics = run_stage("finetune_spam", p, progress=False)
    out = Path(p.paths.spam_classifier)
    plain, _ = load_checkpoint(Path(params("plain").paths.spam_classifier))
    model, config = load_checkpoint(out)
    assert plain.logit_offset is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k
    weights = p.finetune_spam.class_weights
    expected = decision_offset([y for _, y in parts["train"]], weights, 0.5)
    assert model.logit_offset == (0.0, pytest.approx(expected))
    assert config["meta"]["decision_spam_share"] == 0.5
    assert 0 <= metrics["val_accuracy"] <= 1
    if soup == 1:
        assert load_trainer_state(out) is not None
        before = (out / "model.safetensors").read_bytes(), read_config(out)
        run_stage("finetune_spam", p, resume=True, progress=False)
        assert ((out / "model.safetensors").read_bytes(), read_config(out)) == before


def test_cv_folds_decide_by_the_same_rule(handful):
    """A share near 1 moves every decision to spam, in the final model and in every fold."""
    from gptpkg.runner import run_stage

    params, parts = handful
    m = run_stage("finetune_spam", params("sure", cv_folds=3, decision_spam_share=0.999999999), progress=False)
    n_ham = sum(1 for _, y in parts["train"] if y == 0)
    assert m["cv_confusion"][0] == [0, n_ham]  # every training ham, held out, called spam
    assert m["test_confusion"][0][0] == 0


def test_onnx_export_carries_the_offset(handful, tmp_path):
    """The export of a classifier with an offset matches it (the stage's own parity check)
    and its logits are the offset-free model's plus the offset."""
    from gptpkg.onnx_classifier import FP32_FILE, OnnxSpamClassifier
    from gptpkg.runner import run_stage

    params, _ = handful
    p = params("exported", f"paths.onnx={tmp_path / 'onnx'}", "export_onnx.int8=false", decision_spam_share=0.5)
    run_stage("finetune_spam", p, progress=False)
    m = run_stage("export_onnx", p)
    assert m["parity_label_mismatches"] == 0 and m["parity_max_abs_logit_diff"] <= 1e-4
    model, _ = load_checkpoint(p.paths.spam_classifier)
    assert model.logit_offset is not None and model.logit_offset[1] != 0.0
    offset = torch.tensor(model.logit_offset)
    model.set_logit_offset(None)
    clf = OnnxSpamClassifier(Path(p.paths.onnx) / FP32_FILE, device="cpu")
    ids = [clf.encode(t) for t in ["Free entry in 2 a wkly comp to win FA Cup final tkts", "ok see you at 5"]]
    onnx_logits = torch.from_numpy(clf.logits_of_ids(ids)).float()
    with torch.no_grad():
        plain = torch.cat([model.eval()(torch.tensor([i]), torch.tensor([len(i)])) for i in ids])
    torch.testing.assert_close(onnx_logits, plain + offset, atol=1e-4, rtol=0)

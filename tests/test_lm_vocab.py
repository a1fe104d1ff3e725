"""`pretrain.lm_vocab: corpus`: next-token prediction over the corpus's tokens only
(`GPT.set_lm_vocab`): the loss, its gradients, generation, checkpoints, and the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import prepared_tiny_workspace

from gptpkg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gptpkg.cli import main
from gptpkg.config import load_params, model_config
from gptpkg.finetune import initial_model
from gptpkg.generate import generate
from gptpkg.model import GPT
from gptpkg.reference import reference_copy

KEEP = [3, 10, 11, 40, 41, 42, 99, 500, 999]  # token ids of a "corpus" (vocab_size 1000)


def _model(vocab=KEEP, vocab_multiple=1, seed=0):
    torch.manual_seed(seed)
    m = GPT(model_config("tiny", vocab_size=1000, vocab_multiple=vocab_multiple))
    if vocab is not None:
        m.set_lm_vocab(vocab)
    return m


def _batch(B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.tensor(KEEP)
    x = keep[torch.randint(0, len(KEEP), (B, T), generator=g)]
    y = keep[torch.randint(0, len(KEEP), (B, T), generator=g)]
    y[0, -4:] = -100  # ignored targets stay ignored
    return x, y


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_loss_is_the_softmax_over_the_kept_tokens_on_both_paths(vocab_multiple):
    fast = _model(vocab_multiple=vocab_multiple)
    plain = reference_copy(fast)
    assert plain.lm_vocab == tuple(KEEP)
    x, y = _batch()
    # by hand: the full logits' KEEP columns, targets renumbered 0..len(KEEP)-1
    with torch.no_grad():
        full = fast.out_head(fast.hidden(x))[..., KEEP]
    index = {t: i for i, t in enumerate(KEEP)}
    y_kept = torch.tensor([[index.get(int(t), -100) for t in row] for row in y])
    want = F.cross_entropy(full.flatten(0, 1), y_kept.flatten(), ignore_index=-100)
    losses = []
    for m in (fast, plain):
        loss = m(x, targets=y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[1], want, atol=1e-5, rtol=1e-5)
    # not the full-vocabulary loss: the other 991 tokens are not in the denominator
    full_loss = F.cross_entropy(fast.out_head(fast.hidden(x))[..., :1000].flatten(0, 1), y.flatten(), ignore_index=-100)
    assert losses[0] < full_loss - 1.0
    grads_plain = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    # tied head: rows of tokens neither read nor scored get no gradient at all
    others = torch.ones(fast.tok_emb.weight.shape[0], dtype=torch.bool)
    others[KEEP] = False
    assert fast.tok_emb.weight.grad[others].abs().max() == 0
    assert fast.tok_emb.weight.grad[KEEP].abs().max() > 0


def test_the_logits_path_of_gpus_scores_the_same_tokens():
    """Under autocast (as on a GPU) the head takes the plain logits path, not the CPU's
    fused chunked loss: it must restrict the same way (bf16 here, so a loose tolerance;
    the full-vocabulary loss is more than 1 away, see above)."""
    m = _model()
    x, y = _batch()
    want = m(x, targets=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, targets=y)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_generation_never_picks_a_token_outside_the_vocabulary():
    m = _model().eval()
    x, _ = _batch(B=2, T=5)
    logits = m(x)
    others = [t for t in range(1000) if t not in KEEP]
    assert torch.isneginf(logits[..., others]).all()
    assert torch.isfinite(logits[..., KEEP]).all()
    torch.manual_seed(0)
    out = generate(m, x, max_new_tokens=12, temperature=2.0, top_k=None)
    assert set(out[:, 5:].flatten().tolist()) <= set(KEEP)
    m.set_lm_vocab(None)  # scoring everything again
    assert torch.isfinite(m(x)).all()


def test_a_target_outside_the_vocabulary_is_an_error_not_ignored():
    m = _model()
    x, y = _batch()
    y[1, 2] = 7  # not in KEEP
    with pytest.raises(ValueError, match="target token id 7 is outside the model's lm_vocab"):
        m(x, targets=y)


@pytest.mark.parametrize("bad", [[], [5, 3], [3, 3, 4], [-1, 4], [4, 1000], [1.5, 3], ["a"], None])
def test_bad_vocabularies_are_refused_by_name(bad):
    m = _model(vocab=None)
    if bad is None:  # a classifier has no next-token head
        m.to_classifier(2)
        bad = KEEP
    with pytest.raises(ValueError, match="lm_vocab"):
        m.set_lm_vocab(bad)
    assert m.lm_vocab is None


def test_checkpoint_round_trip_and_fine_tuning_starts_score_everything(tmp_path):
    m = _model()
    save_checkpoint(tmp_path / "pre", m, meta={"stage": "pretrain"})
    loaded, config = load_checkpoint(tmp_path / "pre")
    assert config["lm_vocab"] == KEEP and loaded.lm_vocab == tuple(KEEP)
    x, y = _batch()
    torch.testing.assert_close(loaded(x, targets=y), m(x, targets=y))
    # fine-tunings (instructions, the classifier) score every token
    assert initial_model("pretrained", "finetune_instruct", str(tmp_path / "pre"), "").lm_vocab is None
    clf = _model()
    clf.to_classifier(2)
    assert clf.lm_vocab is None and clf.lm_rows is None
    # a broken vocabulary in config.json: a named checkpoint error
    cfg_file = tmp_path / "pre" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lm_vocab"] = [4, 2]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: lm_vocab: expected a non-empty increasing list"):
        load_checkpoint(tmp_path / "pre")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_tiny_workspace(tmp_path_factory.mktemp("lm_vocab"))


def test_pretrain_stage_scores_the_corpus_tokens(prepared, monkeypatch, capsys):
    monkeypatch.chdir(prepared)
    sets = ["--set", "pretrain.max_steps=4", "--set", "pretrain.eval_every=2"]
    assert main(["pretrain", "--no-progress", *sets, "--set", "pretrain.lm_vocab=corpus"]) == 0
    corpus = load_params("params.yaml")["pretrain"]["corpus"]
    parts = [np.load(f"data/processed/corpus/{s}.{p}.npy") for s in corpus for p in ("train", "val")]
    want = np.union1d(np.concatenate(parts), [50256] if len(corpus) > 1 else []).astype(int).tolist()
    config = json.loads(Path("models/pretrained/config.json").read_text())
    assert config["lm_vocab"] == want
    assert config["meta"]["stage_params"]["lm_vocab"] == "corpus"
    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert metrics["lm_vocab_size"] == len(want) < 50257
    model, _ = load_checkpoint("models/pretrained")
    assert model.lm_vocab == tuple(want)
    torch.manual_seed(0)
    out = generate(model, torch.tensor([[50256]]), max_new_tokens=20, temperature=5.0)
    assert set(out[0, 1:].tolist()) <= set(want)
    before = Path("models/pretrained/model.safetensors").read_bytes()

    # a bad value names the key and the choices, and leaves the checkpoint alone
    assert main(["pretrain", "--no-progress", *sets, "--set", "pretrain.lm_vocab=tokens"]) == 1
    err = capsys.readouterr().err
    assert "params.pretrain.lm_vocab: expected one of ['full', 'corpus'], got 'tokens'" in err
    assert Path("models/pretrained/model.safetensors").read_bytes() == before

    # --resume refuses a checkpoint pretrained over the other vocabulary
    assert main(["pretrain", "--no-progress", "--resume", *sets, "--set", "pretrain.lm_vocab=full"]) == 1
    assert "['lm_vocab']" in capsys.readouterr().err
    assert Path("models/pretrained/model.safetensors").read_bytes() == before

    # the full vocabulary: a different model, scoring every token
    assert main(["pretrain", "--no-progress", *sets, "--set", "pretrain.lm_vocab=full"]) == 0
    assert json.loads(Path("models/pretrained/config.json").read_text())["lm_vocab"] is None
    assert json.loads(Path("metrics/pretrain.json").read_text())["lm_vocab_size"] == 50257

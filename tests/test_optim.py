"""Row-sparse AdamW for a classifier's token embedding: the same weights as AdamW."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import Interrupted, dying

from gptpkg import checkpoint as ckpt
from gptpkg.config import ConfigError, TrainConfig
from gptpkg.errors import GptpkgError
from gptpkg.loggers import NullLogger
from gptpkg.model import GPT, GPTClassifier
from gptpkg.optim import OptimizerSet, RowSparseAdamW, clip_grad_norm_, make_optimizer, row_sparse_embedding
from gptpkg.presets import model_config
from gptpkg.train import Task, classification_loss, fit, plan_run

CPU = torch.device("cpu")


def quiet(resume=False):
    """What `fit` reads from a StageContext: no logging, no progress bar."""
    return SimpleNamespace(logger=NullLogger(), resume=resume, progress=False)


def run_fit(model, data, cfg, ctx=None, **task):
    """`fit` on the plan `plan_run` makes from `cfg`, with a Task of `data` and `task`."""
    return fit(model, plan_run(cfg, model, data, _collate), Task(data, **task), ctx)


def test_row_sparse_adamw_matches_adamw_with_decay_a_schedule_and_rows_joining_late():
    torch.manual_seed(0)
    ref = nn.Embedding(40, 6)
    lazy = nn.Embedding(40, 6, sparse=True)
    lazy.weight.data.copy_(ref.weight.data)
    kw = dict(betas=(0.9, 0.95), weight_decay=0.3)
    dense_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, fused=True, **kw)
    sparse_opt = RowSparseAdamW(lazy.parameters(), lr=0.01, **kw)
    sparse_opt.watch(lazy)  # rows read by a forward are brought up to date first
    # Rows 0-9 from the start, 20-24 from step 4, 30 only at step 9; 35-39 never.
    batches = [torch.randint(0, 10, (3, 5)) for _ in range(4)]
    batches += [torch.cat([torch.randint(0, 10, (3, 3)), torch.randint(20, 25, (3, 2))], 1) for _ in range(5)]
    batches += [torch.tensor([[30, 1, 1]])] + [torch.randint(0, 25, (2, 4)) for _ in range(3)]
    for i, idx in enumerate(batches):
        lr = 0.01 * (1 + (i % 3))  # changing lr: the owed decay is a product, not a power
        for opt in (dense_opt, sparse_opt):
            opt.param_groups[0]["lr"] = lr
        for emb, opt in ((ref, dense_opt), (lazy, sparse_opt)):
            (emb(idx) ** 2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert lazy.weight.grad is None
    untouched = list(range(35, 40))
    # Before flush, rows that never had a gradient still owe their decay ...
    assert not torch.allclose(lazy.weight[untouched], ref.weight[untouched])
    sparse_opt.flush()
    # ... after it every row equals AdamW's.
    torch.testing.assert_close(lazy.weight, ref.weight, rtol=1e-5, atol=1e-6)
    st = sparse_opt.state[lazy.weight]
    seen = set(torch.cat([b.flatten() for b in batches]).tolist())
    assert (
        set((st["slot"] >= 0).nonzero().flatten().tolist())
        == seen
        == set(st["rows_by_slot"][: st["n_touched"]].tolist())
    )


def test_clip_grad_norm_takes_sparse_gradients_like_torch_takes_dense_ones():
    torch.manual_seed(1)
    idx = torch.tensor([[1, 2, 2, 7]])
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(1)
        emb, lin = nn.Embedding(9, 4, sparse=sparse), nn.Linear(4, 3)
        lin(emb(idx)).pow(2).sum().backward()
        params = list(emb.parameters()) + list(lin.parameters())
        if sparse:
            total = clip_grad_norm_(params, 0.5)
        else:
            total = torch.nn.utils.clip_grad_norm_(params, 0.5)
        grads[sparse] = (total, emb.weight.grad.to_dense(), lin.weight.grad.clone())
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert grads[True][0] > 0.5  # the clip did scale
    torch.testing.assert_close(grads[True][1], grads[False][1])
    torch.testing.assert_close(grads[True][2], grads[False][2])


def _classifier(seed=5):
    torch.manual_seed(seed)
    return GPTClassifier(GPT(model_config("tiny", drop_rate=0.0)), 2)


def _texts():
    g = torch.Generator().manual_seed(3)
    # Tokens from a small part of the vocabulary: most embedding rows never get a gradient.
    return [
        {"input_ids": torch.randint(100, 400, (int(n),), generator=g), "label": int(i % 2)}
        for i, n in enumerate(torch.randint(3, 12, (24,), generator=g))
    ]


def _collate(items):
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), 50256)
    for r, it in enumerate(items):
        ids[r, : len(it["input_ids"])] = it["input_ids"]
    return {
        "input_ids": ids,
        "lengths": torch.tensor([len(it["input_ids"]) for it in items]),
        "labels": torch.tensor([it["label"] for it in items]),
    }


def test_fit_gives_a_classifier_the_same_weights_with_the_row_sparse_embedding():
    cfg = TrainConfig(
        lr=3e-3,
        warmup_steps=2,
        epochs=0,
        max_steps=10,
        batch_size=4,
        eval_every=5,
        seed=7,
        device="cpu",
        compile=False,
        weight_decay=0.1,
        grad_clip=1.0,
        grad_accum_steps=2,
    )
    models = {}
    for sparse in (True, False):
        model = _classifier()
        assert (row_sparse_embedding(model, sparse, CPU, True, False) is not None) == sparse
        run_fit(
            model,
            _texts(),
            cfg.replace(sparse_embedding=sparse),
            loss_fn=classification_loss([1.0, 2.0]),
            ctx=quiet(),
        )
        assert model.backbone.tok_emb.sparse is False  # restored after training
        models[sparse] = model
    sparse, dense = models[True].state_dict(), models[False].state_dict()
    assert not torch.equal(sparse["backbone.tok_emb.weight"], _classifier().state_dict()["backbone.tok_emb.weight"])
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-5, msg=name)


def test_only_an_untied_trainable_embedding_on_one_cpu_process_is_row_sparse():
    cfg = TrainConfig()
    assert cfg.sparse_embedding is True
    lm = GPT(model_config("tiny"))  # tied head: its gradient fills every row
    assert row_sparse_embedding(lm, True, CPU, True, False) is None
    clf = _classifier()
    assert row_sparse_embedding(clf, True, CPU, True, False) is clf.backbone.tok_emb
    assert row_sparse_embedding(clf, False, CPU, True, False) is None  # sparse_embedding: false
    assert row_sparse_embedding(clf, True, torch.device("cuda"), True, False) is None
    assert row_sparse_embedding(clf, True, CPU, False, False) is None  # DDP
    assert row_sparse_embedding(clf, True, CPU, True, True) is None  # torch.compile
    clf.set_trainable("head")
    assert row_sparse_embedding(clf, True, CPU, True, False) is None
    clf = _classifier()
    opt, context = make_optimizer(clf, cfg, CPU)
    assert isinstance(opt, OptimizerSet)
    dense, rows = opt.optimizers
    assert isinstance(dense, torch.optim.AdamW) and isinstance(rows, RowSparseAdamW)
    assert rows.param_groups[0]["params"] == [clf.backbone.tok_emb.weight]
    assert all(p is not clf.backbone.tok_emb.weight for g in dense.param_groups for p in g["params"])
    with context:  # the embedding is sparse while training in it, and restored after
        assert clf.backbone.tok_emb.sparse is True
    assert clf.backbone.tok_emb.sparse is False
    opt, _ = make_optimizer(_classifier(), cfg.replace(sparse_embedding=False), CPU)
    assert isinstance(opt, torch.optim.AdamW)


def test_an_interrupted_row_sparse_run_resumes_to_the_same_weights_and_refuses_another_layout(tmp_path):
    cfg = TrainConfig(
        lr=3e-3,
        warmup_steps=0,
        epochs=0,
        max_steps=8,
        batch_size=4,
        eval_every=4,
        seed=7,
        device="cpu",
        compile=False,
        checkpoint_every=4,
    )
    full = _classifier()
    run_fit(full, _texts(), cfg, loss_fn=classification_loss(), ctx=quiet())

    with pytest.raises(Interrupted):  # killed during step 6, after the checkpoint of step 4
        run_fit(
            _classifier(),
            _texts(),
            cfg,
            loss_fn=dying(classification_loss(), 6),
            checkpoint_dir=tmp_path,
            ctx=quiet(),
        )
    state = ckpt.load_trainer_state(tmp_path)
    assert state["step"] == 4 and state["optimizer"]["kinds"] == ["AdamW", "RowSparseAdamW"]
    # sparse_embedding is a training param: --resume refuses another value ...
    with pytest.raises(ConfigError, match=r"other values for \['sparse_embedding'\]"):
        run_fit(
            _classifier(),
            _texts(),
            cfg.replace(sparse_embedding=False),
            loss_fn=classification_loss(),
            checkpoint_dir=tmp_path,
            ctx=quiet(resume=True),
        )
    # ... and a run whose embedding is dense for another reason (here: frozen) cannot take
    # this optimizer state, and says why ...
    frozen = _classifier()
    frozen.set_trainable("head")
    with pytest.raises(GptpkgError, match=r"written by \['AdamW', 'RowSparseAdamW'\].*uses \['AdamW'\]"):
        run_fit(
            frozen,
            _texts(),
            cfg,
            loss_fn=classification_loss(),
            checkpoint_dir=tmp_path,
            ctx=quiet(resume=True),
        )
    # ... the same layout continues to the uninterrupted run's weights.
    resumed = _classifier(seed=99)
    run_fit(resumed, _texts(), cfg, loss_fn=classification_loss(), checkpoint_dir=tmp_path, ctx=quiet(resume=True))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_sparse_embedding_setting_is_checked():
    for bad in ("yes", "auto", "false", 1):
        with pytest.raises(ConfigError, match=r"params.finetune_spam.sparse_embedding: expected true\|false"):
            TrainConfig.parse({"sparse_embedding": bad}, "params.finetune_spam")
    assert TrainConfig.parse({"sparse_embedding": False}, "params.finetune_spam").sparse_embedding is False


def test_a_row_sparse_run_writes_the_same_trainer_state_bytes_twice(tmp_path):
    """The optimizer state in a final checkpoint is a pipeline output: the same run
    writes the same bytes, slots of rows never touched included."""
    cfg = TrainConfig(lr=3e-3, epochs=0, max_steps=3, batch_size=4, eval_every=0, device="cpu", compile=False)
    for name in ("a", "b"):
        junk = torch.full((1 << 20,), 7, dtype=torch.long)  # leave non-zero memory behind to reuse
        del junk
        run_fit(_classifier(), _texts(), cfg, loss_fn=classification_loss(), checkpoint_dir=tmp_path / name)
    assert ckpt.load_trainer_state(tmp_path / "a")["optimizer"]["kinds"] == ["AdamW", "RowSparseAdamW"]
    assert (tmp_path / "a" / "trainer.pt").read_bytes() == (tmp_path / "b" / "trainer.pt").read_bytes()

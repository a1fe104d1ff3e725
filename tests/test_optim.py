"""Row-sparse AdamW for a classifier's token embedding: the same weights as AdamW."""

import pytest
import torch
import torch.nn as nn

from gptpkg import checkpoint as ckpt
from gptpkg.config import ConfigError, TrainConfig, model_config
from gptpkg.errors import GptpkgError
from gptpkg.model import GPT
from gptpkg.optim import OptimizerSet, RowSparseAdamW, clip_grad_norm_
from helpers import Interrupted, dying
from gptpkg.train import classification_loss, fit, make_optimizer, sparse_embedding

CPU = torch.device("cpu")


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
    assert set((st["slot"] >= 0).nonzero().flatten().tolist()) == seen == set(st["rows_by_slot"][: st["n_touched"]].tolist())


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
    return GPT(model_config("tiny", drop_rate=0.0)).to_classifier(2)


def _texts():
    g = torch.Generator().manual_seed(3)
    # Tokens from a small part of the vocabulary: most embedding rows never get a gradient.
    return [{"input_ids": torch.randint(100, 400, (int(n),), generator=g), "label": int(i % 2)}
            for i, n in enumerate(torch.randint(3, 12, (24,), generator=g))]


def _collate(items):
    n = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), n), 50256)
    for r, it in enumerate(items):
        ids[r, : len(it["input_ids"])] = it["input_ids"]
    return {"input_ids": ids, "lengths": torch.tensor([len(it["input_ids"]) for it in items]),
            "labels": torch.tensor([it["label"] for it in items])}


def test_fit_gives_a_classifier_the_same_weights_with_the_row_sparse_embedding():
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, epochs=0, max_steps=10, batch_size=4, eval_every=5, seed=7,
                      device="cpu", compile="false", weight_decay=0.1, grad_clip=1.0, grad_accum_steps=2)
    models = {}
    for mode in ("auto", "false"):
        model = _classifier()
        assert (sparse_embedding(model, TrainConfig(sparse_embedding=mode), CPU, False, False) is not None) == (mode == "auto")
        fit(model, _texts(), _collate, TrainConfig(**{**cfg.__dict__, "sparse_embedding": mode}),
            loss_fn=classification_loss([1.0, 2.0]), progress=False)
        assert model.tok_emb.sparse is False  # restored after training
        models[mode] = model
    sparse, dense = models["auto"].state_dict(), models["false"].state_dict()
    assert not torch.equal(sparse["tok_emb.weight"], _classifier().state_dict()["tok_emb.weight"])
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-5, msg=name)


def test_only_an_untied_trainable_embedding_on_one_cpu_process_is_row_sparse():
    cfg = TrainConfig()
    lm = GPT(model_config("tiny"))  # tied head: its gradient fills every row
    assert sparse_embedding(lm, cfg, CPU, False, False) is None
    clf = _classifier()
    assert sparse_embedding(clf, cfg, CPU, False, False) is clf.tok_emb
    assert sparse_embedding(clf, cfg, torch.device("cuda"), False, False) is None
    assert sparse_embedding(clf, cfg, CPU, True, False) is None  # DDP
    assert sparse_embedding(clf, cfg, CPU, False, True) is None  # torch.compile
    clf.set_trainable("head")
    assert sparse_embedding(clf, cfg, CPU, False, False) is None
    opt = make_optimizer(_classifier(), cfg, CPU, row_sparse=_classifier().tok_emb.weight)
    assert isinstance(opt, OptimizerSet)


def test_an_interrupted_row_sparse_run_resumes_to_the_same_weights_and_refuses_another_layout(tmp_path):
    cfg = dict(lr=3e-3, warmup_steps=0, epochs=0, max_steps=8, batch_size=4, eval_every=4, seed=7,
               device="cpu", compile="false")
    full = _classifier()
    fit(full, _texts(), _collate, TrainConfig(**cfg), loss_fn=classification_loss(), progress=False)

    with pytest.raises(Interrupted):  # killed during step 6, after the checkpoint of step 4
        fit(_classifier(), _texts(), _collate, TrainConfig(**{**cfg, "checkpoint_every": 4}),
            loss_fn=dying(classification_loss(), 6), checkpoint_dir=tmp_path, progress=False)
    state = ckpt.load_trainer_state(tmp_path)
    assert state["step"] == 4 and state["optimizer"]["kinds"] == ["AdamW", "RowSparseAdamW"]
    # A dense-embedding run cannot take this optimizer state, and says why ...
    with pytest.raises(GptpkgError, match=r"written by \['AdamW', 'RowSparseAdamW'\].*uses \['AdamW'\]"):
        fit(_classifier(), _texts(), _collate, TrainConfig(**{**cfg, "sparse_embedding": "false"}),
            loss_fn=classification_loss(), checkpoint_dir=tmp_path, resume=True, progress=False)
    # ... the same layout continues to the uninterrupted run's weights.
    resumed = _classifier(seed=99)
    fit(resumed, _texts(), _collate, TrainConfig(**cfg), loss_fn=classification_loss(), checkpoint_dir=tmp_path,
        resume=True, progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_sparse_embedding_setting_is_checked():
    from gptpkg.config import ConfigError
    with pytest.raises(ConfigError, match="sparse_embedding must be auto|false"):
        TrainConfig(sparse_embedding="yes")


def _changes(seed_model, trained) -> dict[str, float]:
    """Mean |weight change| per part of the model (the embedding over its touched rows)."""
    before, after = seed_model.state_dict(), trained.state_dict()
    d = {k: (after[k] - before[k]).abs() for k in before}
    rows = d["tok_emb.weight"].sum(1) > 0
    return {"emb": d["tok_emb.weight"][rows].mean().item(), "block0": d["blocks.0.mlp.fc.weight"].mean().item(),
            "block1": d["blocks.1.mlp.fc.weight"].mean().item(), "head": d["out_head.weight"].mean().item()}


def test_layer_wise_lr_decay_trains_each_depth_at_its_share_of_the_lr():
    cfg = dict(lr=3e-3, warmup_steps=0, epochs=0, max_steps=6, batch_size=4, eval_every=0, seed=7, device="cpu",
               compile="false", weight_decay=0.0, min_lr_ratio=1.0)
    change, trained = {}, {}
    for decay, mode in ((1.0, "auto"), (0.5, "auto"), (0.5, "false")):
        model = _classifier()
        fit(model, _texts(), _collate, TrainConfig(**cfg, lr_layer_decay=decay, sparse_embedding=mode),
            loss_fn=classification_loss(), progress=False)
        change[decay, mode], trained[decay, mode] = _changes(_classifier(), model), model
    # Adam's steps are about lr in size, so each depth's change shrinks by its factor
    # (tiny: 2 blocks; head 1, block 1 x0.5, block 0 x0.25, embeddings x0.125) ...
    plain, decayed = change[1.0, "auto"], change[0.5, "auto"]
    for part, factor in (("block1", 0.5), ("block0", 0.25), ("emb", 0.125)):
        ratio = (decayed[part] / decayed["head"]) / (plain[part] / plain["head"])
        assert 0.5 * factor < ratio < 2 * factor, (part, ratio)
    # ... the row-sparse embedding's optimizer included: the same weights as dense AdamW.
    sparse, dense = trained[0.5, "auto"].state_dict(), trained[0.5, "false"].state_dict()
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-5, msg=name)


def test_layer_wise_lr_decay_groups_and_its_default_leaves_the_groups_as_they_were():
    from gptpkg.train import layer_lr_scales, param_groups

    model = _classifier()
    plain = param_groups(model, 0.1)
    assert len(plain) == 2 and all("lr_scale" not in g for g in plain)
    groups = param_groups(model, 0.1, lr_layer_decay=0.5)
    scales = layer_lr_scales(model, 0.5)
    assert sorted({g["lr_scale"] for g in groups}) == [0.125, 0.25, 0.5, 1.0]
    for g in groups:
        assert all(scales[id(p)] == g["lr_scale"] for p in g["params"])
        assert g["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert scales[id(model.tok_emb.weight)] == scales[id(model.pos_emb.weight)] == 0.125
    assert scales[id(model.final_norm.weight)] == scales[id(model.out_head.weight)] == 1.0
    opt = make_optimizer(model, TrainConfig(lr_layer_decay=0.5), CPU, row_sparse=model.tok_emb.weight)
    assert opt.optimizers[-1].param_groups[0]["lr_scale"] == 0.125
    with pytest.raises(ValueError, match="lr_layer_decay needs a GPT"):
        param_groups(nn.Linear(3, 2), 0.1, lr_layer_decay=0.5)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"lr_layer_decay must be in \(0, 1\]"):
            TrainConfig(lr_layer_decay=bad)


def test_label_smoothing_is_cross_entropy_towards_the_smoothed_targets():
    model = _classifier().eval()
    batch = _collate(_texts()[:6])
    with torch.no_grad():
        logp = torch.log_softmax(model(batch["input_ids"], lengths=batch["lengths"]), -1)
        y = batch["labels"]
        for s in (0.0, 0.1, 0.3):
            loss, _ = classification_loss(None, s)(model, batch)
            expected = -((1 - s) * logp[torch.arange(len(y)), y] + s / 2 * logp.sum(-1)).mean()
            torch.testing.assert_close(loss, expected)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
            classification_loss(None, bad)

import math

import pytest
import torch
import torch.nn.functional as F

from gptpkg.config import ConfigError
from gptpkg.model import GPT, GPTClassifier, KVCache
from gptpkg.presets import model_config


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(model_config("tiny")).eval()


def manual_attention_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The textbook forward with an explicit causal mask, from the same weights."""
    B, T = idx.shape
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for blk in model.blocks:
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).split(x.shape[-1], dim=2)
        H = model.cfg.n_heads
        q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + blk.attn.proj(y)
        h = blk.norm2(x)
        g = blk.mlp.fc(h)
        g = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        x = x + blk.mlp.proj(g)
    return model.out_head(model.final_norm(x))


def test_sdpa_matches_explicit_masked_attention(tiny):
    idx = torch.randint(0, 50257, (2, 17))
    torch.testing.assert_close(tiny(idx), manual_attention_forward(tiny, idx), atol=1e-5, rtol=1e-5)


def test_causality(tiny):
    idx = torch.randint(0, 50257, (1, 10))
    other = idx.clone()
    other[0, 7:] = 5
    torch.testing.assert_close(tiny(idx)[:, :7], tiny(other)[:, :7])


def test_kv_cache_logits_match_uncached(tiny):
    idx = torch.randint(0, 50257, (2, 12))
    full = tiny(idx)
    cache = KVCache(tiny.cfg.n_layers)
    parts = [tiny(idx[:, :5], cache=cache)] + [tiny(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    # a multi-token step after a prefill (uses the explicit offset mask)
    cache = KVCache(tiny.cfg.n_layers)
    a = tiny(idx[:, :4], cache=cache)
    b = tiny(idx[:, 4:9], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, :9], atol=1e-5, rtol=0)


def test_context_length_is_enforced(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context_length 128"):
        tiny(torch.zeros(1, 129, dtype=torch.long))


def test_tied_head_and_init():
    torch.manual_seed(0)
    model = GPT(model_config("cpu-mini"))
    assert model.out_head.weight is model.tok_emb.weight
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 4)) < 0.002
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert model.blocks[0].norm1.eps == 1e-5
    untied = GPT(model_config("tiny", tie_weights=False, qkv_bias=False))
    assert untied.out_head.weight is not untied.tok_emb.weight
    assert untied.blocks[0].attn.qkv.bias is None


def test_dropout_switches():
    torch.manual_seed(0)
    model = GPT(model_config("tiny", drop_rate=0.5))
    idx = torch.randint(0, 50257, (1, 8))
    model.train()
    assert not torch.allclose(model(idx), model(idx))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))


def test_set_drop_rate_reaches_every_dropout(tmp_path):
    torch.manual_seed(0)
    model = GPT(model_config("tiny", drop_rate=0.5))
    idx = torch.randint(0, 50257, (2, 8))
    model.eval()
    clean = model(idx)
    model.set_drop_rate(0.0)
    assert model.cfg.drop_rate == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(b.attn.drop_rate == 0.0 for b in model.blocks)  # SDPA's attention dropout
    model.train()  # no dropout left anywhere: training mode gives the eval logits
    torch.testing.assert_close(model(idx), clean)
    model.set_drop_rate(0.3)
    assert not torch.allclose(model(idx), clean)
    # a checkpoint of the model records the new rate
    from gptpkg.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "m", model)
    assert load_checkpoint(tmp_path / "m")[0].cfg.drop_rate == 0.3
    with pytest.raises(ConfigError, match="drop_rate"):
        model.set_drop_rate(1.0)
    assert model.cfg.drop_rate == 0.3


def test_fine_tuning_drop_rate_overrides_the_checkpoint(tmp_path):
    from helpers import params_in

    from gptpkg.checkpoint import save_checkpoint
    from gptpkg.finetune import initial_model

    params = params_in(tmp_path)
    save_checkpoint(params.paths.pretrained, GPT(model_config("tiny", drop_rate=0.1)))
    pre = params.paths
    instruct = params_in(
        tmp_path,
        "finetune_instruct.init=pretrained",
        "finetune_instruct.max_length=64",
        "finetune_instruct.drop_rate=null",
    ).finetune_instruct
    kept = initial_model(instruct, "finetune_instruct", pre)
    assert kept.cfg.drop_rate == 0.1 and kept.drop.p == 0.1
    off = initial_model(instruct.replace(drop_rate=0.0), "finetune_instruct", pre)
    assert off.cfg.drop_rate == 0.0 and off.drop.p == 0.0
    torch.testing.assert_close(off.state_dict(), kept.state_dict())  # same weights
    spam = params_in(
        tmp_path,
        "finetune_spam.init=scratch",
        "finetune_spam.model=tiny",
        "finetune_spam.max_length=32",
        "finetune_spam.drop_rate=0.2",
    ).finetune_spam
    scratch = initial_model(spam, "finetune_spam", pre)
    assert scratch.cfg.drop_rate == 0.2 and scratch.blocks[0].attn.drop_rate == 0.2
    with pytest.raises(ConfigError, match=r"params.finetune_spam.drop_rate: expected null .* got 1.5"):
        params_in(tmp_path, "finetune_spam.drop_rate=1.5")
    # the start model's context must hold max_length
    with pytest.raises(
        ConfigError, match="params.finetune_instruct.max_length=200 exceeds the start model's context_length 128"
    ):
        initial_model(instruct.replace(max_length=200), "finetune_instruct", pre)


def test_classifier_reads_the_last_real_token_ignoring_padding_and_batch_mates(tiny):
    clf = GPTClassifier(tiny, 2).eval()
    a = torch.randint(0, 50256, (1, 6))
    padded = torch.cat([a, torch.full((1, 4), 50256)], dim=1)
    alone = clf(a, torch.tensor([6]))
    in_batch = clf(torch.cat([padded, torch.randint(0, 50256, (1, 10))]), torch.tensor([6, 10]))
    assert alone.shape == (1, 2)
    torch.testing.assert_close(in_batch[:1], alone, atol=1e-5, rtol=0)
    h = tiny.hidden(a)[0]  # (6, C)
    torch.testing.assert_close(alone[0], clf.head(h[-1]), atol=1e-5, rtol=0)
    # not the last padded position
    last_pos = clf.head(tiny.hidden(padded)[:, -1])
    assert not torch.allclose(last_pos, alone)


def test_a_classifier_is_built_around_the_language_model(tiny):
    """The backbone loses its LM head (the tied embedding then trains alone); the head is
    drawn as a fresh Linear(C, n_classes) with GPT-2's init at that point of the RNG
    stream; the parameters keep the order of the backbone's, head last."""
    lm_names = [n for n, _ in tiny.named_parameters() if not n.startswith("out_head")]
    torch.manual_seed(7)
    clf = GPTClassifier(tiny, 3)
    torch.manual_seed(7)
    expected = torch.nn.Linear(tiny.cfg.emb_dim, 3)
    torch.nn.init.normal_(expected.weight, mean=0.0, std=0.02)
    assert torch.equal(clf.head.weight, expected.weight) and not clf.head.bias.any()
    assert clf.backbone is tiny and tiny.out_head is None and not tiny.tied
    assert [n for n, _ in clf.named_parameters()] == [f"backbone.{n}" for n in lm_names] + ["head.weight", "head.bias"]
    assert sum(p is tiny.tok_emb.weight for _, p in clf.named_parameters(remove_duplicate=False)) == 1
    assert clf.cfg is tiny.cfg and clf.num_params() == sum(p.numel() for p in clf.parameters())
    with pytest.raises(ValueError, match="classifier's backbone: its LM head was dropped"):
        tiny(torch.zeros(1, 3, dtype=torch.long))


def test_the_language_model_is_only_a_language_model(tiny):
    """`GPT.forward(idx, targets=None, cache=None)`: logits, or with targets the loss."""
    idx = torch.randint(0, 50257, (2, 5))
    assert tiny(idx).shape == (2, 5, 50257)
    loss = tiny(idx[:, :-1], idx[:, 1:])
    assert loss.shape == () and torch.equal(loss, tiny(idx[:, :-1], targets=idx[:, 1:]))
    for name in ("classify", "to_classifier", "set_logit_offset", "logit_offset", "n_classes", "set_trainable"):
        assert not hasattr(tiny, name), name
    with pytest.raises(TypeError):
        tiny(idx, lengths=torch.tensor([5, 5]))


def test_trainable_parts(tiny):
    clf = GPTClassifier(tiny, 2)
    names = lambda: {n for n, p in clf.named_parameters() if p.requires_grad}  # noqa: E731
    clf.set_trainable("head")
    assert names() == {"head.weight", "head.bias"}
    clf.set_trainable("last_blocks", 1)
    got = names()
    assert {"head.weight", "backbone.final_norm.weight", "backbone.blocks.1.attn.qkv.weight"} <= got
    assert not any(n.startswith("backbone.blocks.0.") or n.startswith("backbone.tok_emb") for n in got)
    clf.set_trainable("all")
    assert len(names()) == len(list(clf.parameters()))
    with pytest.raises(ValueError, match="n_blocks must be in 1..2"):
        clf.set_trainable("last_blocks", 3)
    with pytest.raises(ValueError, match="head\\|last_blocks\\|all"):
        clf.set_trainable("some")


def test_gradients_flow_to_all_parameters(tiny):
    tiny.train()
    idx = torch.randint(0, 50257, (2, 8))
    loss = F.cross_entropy(tiny(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.parameters())

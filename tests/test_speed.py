"""The fast training path against the textbook one, and the fused head loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptpkg.losses import chunked_head_loss
from gptpkg.model import GPT, GPTClassifier
from gptpkg.presets import model_config
from gptpkg.reference import ReferenceGPT, reference_copy


def _pair(**over):
    torch.manual_seed(0)
    fast = GPT(model_config("tiny", vocab_size=1000, **over))  # small vocab: fast tests
    return fast, reference_copy(fast)


def _batch(cfg, B=3, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y[0, -5:] = -100  # some ignored targets, as padding produces
    return x, y


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_fast_and_plain_paths_agree_on_logits_loss_and_gradients(vocab_multiple):
    fast, plain = _pair(vocab_multiple=vocab_multiple)
    assert isinstance(plain, ReferenceGPT)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x, y = _batch(fast.cfg)
    torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-4)
    assert fast(x).shape[-1] == fast.cfg.vocab_size  # padded rows sliced off
    losses = []
    for m in (fast, plain):
        loss = m(x, targets=y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    # the loss is the textbook one: cross-entropy of the (sliced) logits
    ref = F.cross_entropy(plain(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(losses[0], ref, atol=1e-5, rtol=1e-5)
    grads_plain = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    if vocab_multiple > 1:  # padded embedding rows get no gradient from the loss
        assert fast.tok_emb.weight.grad[fast.cfg.vocab_size :].abs().max() == 0


def test_fast_and_plain_classifier_paths_agree():
    fast, _ = _pair()
    fast = GPTClassifier(fast, 2)
    fast.set_logit_offset([0.0, 0.5])
    plain = reference_copy(fast)
    assert isinstance(plain, GPTClassifier) and isinstance(plain.backbone, ReferenceGPT)
    assert plain.logit_offset == (0.0, 0.5)
    x, _ = _batch(fast.cfg)
    lengths = torch.tensor([20, 7, 1])
    torch.testing.assert_close(fast(x, lengths), plain(x, lengths), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_head_loss_matches_cross_entropy_and_its_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=g)
    t[::4] = -100
    loss = chunked_head_loss(h, w, t, chunk)
    (loss * 3.0).backward()  # a scaled upstream gradient must flow through
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), t, ignore_index=-100)
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():  # eval: same value, no gradient work
        torch.testing.assert_close(chunked_head_loss(h, w, t, chunk), ref.detach())


def test_fast_path_trains_like_plain_path_for_a_few_steps():
    fast, plain = _pair()
    x, y = _batch(fast.cfg, B=4, T=32)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=f) for m, f in ((fast, True), (plain, False))]
    for _ in range(3):
        for m, opt in zip((fast, plain), opts):
            m(x, targets=y).backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-3)


def test_fast_gpu_profile_parses_and_pads_the_vocabulary():
    from pathlib import Path

    from gptpkg.config import load_params

    root = Path(__file__).resolve().parents[1]
    cfg = load_params(root / "params.yaml", profile="fast").pretrain
    mcfg = cfg.architecture()
    assert mcfg == model_config(cfg.model, drop_rate=cfg.drop_rate, vocab_multiple=cfg.vocab_multiple)
    assert (mcfg.padded_vocab_size, cfg.max_length, cfg.precision, cfg.compile) == (50304, 1024, "bf16", True)
    assert cfg.batch_size % 8 == 0  # splits evenly over 1, 2, 4 or 8 GPUs


def test_gpu_switches_of_fit_on_a_cpu():
    from gptpkg.config import TrainConfig
    from gptpkg.optim import make_optimizer
    from gptpkg.train import autocast_dtype, should_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert should_compile("auto", cuda) and not should_compile("auto", cpu) and should_compile(True, cpu)
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("auto", cpu) is None
    model = GPT(model_config("tiny", vocab_size=100))
    optimizer, _ = make_optimizer(model, TrainConfig(), cpu)
    assert optimizer.defaults["fused"] is True


def test_loss_under_bf16_autocast_takes_the_logits_path_and_stays_close():
    fast, _ = _pair(vocab_multiple=64)
    x, y = _batch(fast.cfg)
    ref = fast(x, targets=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x, targets=y)
    low.backward()
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=2e-2, rtol=2e-2)
    assert fast.tok_emb.weight.grad[fast.cfg.vocab_size :].abs().max() == 0

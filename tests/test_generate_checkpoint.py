import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptpkg import checkpoint as ckpt
from gptpkg.files import atomic_dir
from gptpkg.generate import generate, generate_text
from gptpkg.model import GPT, GPTClassifier, StaticKVCache
from gptpkg.presets import model_config


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(model_config("tiny")).eval()


def test_cached_and_uncached_decoding_give_the_same_tokens(tiny):
    idx = torch.randint(0, 50257, (2, 7))
    a = generate(tiny, idx, 30, use_cache=True)
    b = generate(tiny, idx, 30, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 37)
    # past the context window (128): the window slides the same way with and without cache
    long = torch.randint(0, 50257, (1, 120))
    assert torch.equal(generate(tiny, long, 20), generate(tiny, long, 20, use_cache=False))


@pytest.mark.parametrize("preset", ["tiny", "cpu-mini"])
def test_a_static_cache_decodes_the_same_tokens_as_no_cache(preset):
    """Greedy decoding with the preallocated cache (buffers written in place, masked
    attention over the whole buffer) gives today's tokens, through the context window's
    slide (a re-prefill into the same buffers) and an end token that stops a row."""
    torch.manual_seed(0)
    model = GPT(model_config(preset)).eval()
    ctx = model.cfg.context_length
    for idx, n in ((torch.randint(0, 50257, (2, 7)), 16), (torch.randint(0, 50257, (1, ctx - 4)), 7)):
        plain = generate(model, idx, n, use_cache=False)
        assert torch.equal(generate(model, idx, n, kv_cache="static"), plain)
        assert torch.equal(generate(model, idx, n, kv_cache="dynamic"), plain)
    eos = plain[0, -3].item()
    assert torch.equal(generate(model, idx, n, eos_id=eos, kv_cache="static"), generate(model, idx, n, eos_id=eos))
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        generate(model, idx, 1, kv_cache="paged")


def test_a_compiled_decode_step_gives_the_same_tokens(tiny):
    """The compiled decode step (CUDA graphs on CUDA; inductor here) over the static
    cache: the same tokens as eager decoding without a cache, past the window's slide."""
    idx = torch.randint(0, 50257, (2, tiny.cfg.context_length - 5))
    assert torch.equal(generate(tiny, idx, 10, kv_cache="compiled"), generate(tiny, idx, 10, use_cache=False))


def test_static_cache_logits_match_the_growing_cache(tiny):
    idx = torch.randint(0, 50257, (2, 12))
    full = tiny(idx)
    cache = StaticKVCache(tiny.cfg, batch_size=2, max_len=16)
    parts = [tiny(idx[:, :5], cache=cache)] + [tiny(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos.item() == 12
    cache.reset()
    torch.testing.assert_close(tiny(idx[:, :9], cache=cache), full[:, :9], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_len must be in 1..context_length=128"):
        StaticKVCache(tiny.cfg, batch_size=1, max_len=129)


def test_sampling_is_seeded_and_top_k_restricts(tiny):
    idx = torch.randint(0, 50257, (1, 4))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = generate(tiny, idx, 10, temperature=1.0, top_k=5, generator=g())
    b = generate(tiny, idx, 10, temperature=1.0, top_k=5, generator=g())
    assert torch.equal(a, b)
    top1 = generate(tiny, idx, 10, temperature=1.0, top_k=1, generator=g())
    assert torch.equal(top1, generate(tiny, idx, 10))  # top-1 sampling is greedy


def test_stops_at_end_token(tiny):
    idx = torch.randint(0, 50257, (1, 4))
    first = generate(tiny, idx, 1)[0, -1].item()
    out = generate(tiny, idx, 10, eos_id=first)
    assert out.shape[1] == 5 and out[0, -1].item() == first


def test_repetition_options_off_give_todays_greedy_tokens(tiny):
    """repetition_penalty 1 and no_repeat_ngram 0 change nothing: the tokens are those of a
    plain argmax loop over the uncached model."""
    idx = torch.randint(0, 50257, (2, 6))
    expected = idx
    with torch.no_grad():
        for _ in range(12):
            expected = torch.cat([expected, tiny(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(tiny, idx, 12, repetition_penalty=1.0, no_repeat_ngram=0), expected)


def _has_repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram_and_repetition_penalty_break_loops(tiny):
    # a random tiny model falls into a loop under greedy decoding
    idx = torch.randint(0, 50257, (1, 5))
    plain = generate(tiny, idx, 40)[0, 5:].tolist()
    assert _has_repeated_ngram(plain, 2)
    for n in (1, 2, 3):
        out = generate(tiny, idx, 40, no_repeat_ngram=n)[0, 5:].tolist()
        assert len(out) == 40 and not _has_repeated_ngram(out, n), n
    # a token of the prompt may still be generated: the rules act on the generated text
    k = next(k for k in range(1, 40) if plain[k] in plain[:k])
    prompt = torch.cat([idx, torch.tensor([plain[:k]])], dim=1)
    assert generate(tiny, prompt, 1, no_repeat_ngram=1, repetition_penalty=1e9)[0, -1].item() == plain[k]
    # a huge penalty works as a ban of every generated token
    out = generate(tiny, idx, 30, repetition_penalty=1e9)[0, 5:].tolist()
    assert len(set(out)) == 30
    with pytest.raises(ValueError, match="repetition_penalty: expected > 0"):
        generate(tiny, idx, 3, repetition_penalty=0.0)


def test_generate_text_strips_prompt(tiny, tok):
    text = generate_text(tiny, tok, "Every effort moves you", 5)
    assert isinstance(text, str) and not text.startswith("Every effort")


def _keys(folder) -> set[str]:
    with safe_open(str(folder / ckpt.WEIGHTS), "pt") as f:
        return set(f.keys())


def test_checkpoint_round_trip(tiny, tmp_path):
    """A language model comes back a GPT (kind "lm", its own key names, the tied head
    stored once); a classifier a GPTClassifier (kind "classifier", its backbone's keys
    under backbone., its head's under head., the decision offset in config.json)."""
    ckpt.save_checkpoint(tmp_path / "m", tiny, meta={"note": "x"})
    model, config = ckpt.load_checkpoint(tmp_path / "m")
    assert isinstance(model, GPT) and model.tied and config["meta"] == {"note": "x"}
    assert config["kind"] == "lm" and config["tied"] is True
    assert _keys(tmp_path / "m") == set(tiny.state_dict()) - {"out_head.weight"}
    idx = torch.randint(0, 50257, (1, 9))
    torch.testing.assert_close(model.eval()(idx), tiny(idx))
    clf = GPTClassifier(GPT(model_config("tiny")), 2).eval()
    clf.set_logit_offset([0.0, 0.25])
    ckpt.save_checkpoint(tmp_path / "c", clf)
    back, config = ckpt.load_checkpoint(tmp_path / "c")
    assert isinstance(back, GPTClassifier) and back.n_classes == 2 and back.logit_offset == (0.0, 0.25)
    assert (config["kind"], config["n_classes"], config["logit_offset"]) == ("classifier", 2, [0.0, 0.25])
    assert _keys(tmp_path / "c") == set(clf.state_dict())
    assert {k.split(".")[0] for k in _keys(tmp_path / "c")} == {"backbone", "head"}
    assert back.backbone.out_head is None
    torch.testing.assert_close(back.head.weight, clf.head.weight)
    lengths = torch.tensor([9])
    assert torch.equal(back.eval()(idx, lengths), clf(idx, lengths))


def _unkinded_classifier(folder, offset):
    """A classifier checkpoint as written before config.json named its kind: one GPT state
    whose out_head is the (n_classes, C) class head with a bias, nothing deleted (the head
    was untied), and n_classes, logit_offset, tied false beside the model config."""
    torch.manual_seed(3)
    cfg = model_config("tiny")
    state = {k: v.clone() for k, v in GPT(cfg).state_dict().items()}
    state["out_head.weight"] = torch.randn(2, cfg.emb_dim) * 0.02
    state["out_head.bias"] = torch.randn(2) * 0.02
    folder.mkdir()
    save_file(state, str(folder / ckpt.WEIGHTS))
    config = {
        "model": cfg.model_dump(),
        "n_classes": 2,
        "logit_offset": offset,
        "tied": False,
        "meta": {"labels": ["ham", "spam"], "max_length": 32, "pad_id": 50256},
    }
    (folder / ckpt.CONFIG).write_text(json.dumps(config, indent=2))
    return cfg, state


def test_a_classifier_checkpoint_without_kind_still_loads(tmp_path):
    """Its tensors land in the classifier unchanged (out_head.* -> head.*, the rest under
    backbone.), the offset comes along, and the outputs are those the old layout meant:
    the head applied to the final-normed hidden state at the last real token, plus the
    offset. Written again, it is a kind "classifier" checkpoint with equal tensors."""
    cfg, state = _unkinded_classifier(tmp_path / "old", [0.0, -0.5])
    model, config = ckpt.load_checkpoint(tmp_path / "old")
    assert isinstance(model, GPTClassifier) and model.n_classes == 2 and model.logit_offset == (0.0, -0.5)
    assert "kind" not in config and config["meta"]["labels"] == ["ham", "spam"]
    mine = model.state_dict()
    assert set(mine) == {
        "head." + k[len("out_head.") :] if k.startswith("out_head.") else "backbone." + k for k in state
    }
    for k, v in state.items():
        new = "head." + k[len("out_head.") :] if k.startswith("out_head.") else "backbone." + k
        assert torch.equal(mine[new], v), k
    lm = GPT(cfg).eval()
    lm.load_state_dict({k: v for k, v in state.items() if not k.startswith("out_head.")}, strict=False)
    ids = torch.randint(0, 50257, (3, 7))
    lengths = torch.tensor([7, 3, 1])
    with torch.no_grad():
        h = lm.hidden(ids)[torch.arange(3), lengths - 1]  # (B, C)
        expected = h @ state["out_head.weight"].t() + state["out_head.bias"] + torch.tensor([0.0, -0.5])
        torch.testing.assert_close(model.eval()(ids, lengths), expected, atol=1e-6, rtol=0)
    ckpt.save_checkpoint(tmp_path / "new", model, config["meta"])
    again, new_config = ckpt.load_checkpoint(tmp_path / "new")
    assert new_config["kind"] == "classifier" and new_config["logit_offset"] == [0.0, -0.5]
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())
    # and a language model written before kinds (n_classes and logit_offset null) is a GPT
    lm_dir = tmp_path / "old_lm"
    ckpt.save_checkpoint(lm_dir, lm)
    old = json.loads((lm_dir / ckpt.CONFIG).read_text())
    del old["kind"]
    old.update(n_classes=None, logit_offset=None)
    (lm_dir / ckpt.CONFIG).write_text(json.dumps(old))
    back, _ = ckpt.load_checkpoint(lm_dir)
    assert isinstance(back, GPT) and back.tied
    assert torch.equal(back.eval()(ids), lm(ids))


def test_generate_refuses_a_classifier(tmp_path, capsys):
    from gptpkg.cli import main

    _unkinded_classifier(tmp_path / "old", None)
    ckpt.save_checkpoint(tmp_path / "new", GPTClassifier(GPT(model_config("tiny")), 2))
    for folder in ("old", "new"):
        assert main(["generate", str(tmp_path / folder), "hi"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {tmp_path / folder} is a classifier, not a language model\n"


def test_failed_write_keeps_the_previous_checkpoint(tiny, tmp_path):
    ckpt.save_checkpoint(tmp_path / "m", tiny)
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(tmp_path / "m") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left


def test_bad_checkpoints_are_named(tiny, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a gptpkg checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    ckpt.save_checkpoint(tmp_path / "m", tiny)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="unreadable safetensors"):
        ckpt.load_checkpoint(tmp_path / "m")
    ckpt.save_checkpoint(tmp_path / "m", tiny)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["n_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="does not match its config"):
        ckpt.load_checkpoint(tmp_path / "m")
    cfg["model"]["n_layers"] = 2
    for key, value, message in (
        ("kind", "regressor", r"config.json: kind: expected 'lm' or 'classifier', got 'regressor'"),
        ("kind", "classifier", r"config.json: n_classes: expected a number of classes >= 1 for a classifier, got None"),
    ):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.load_checkpoint(tmp_path / "m")

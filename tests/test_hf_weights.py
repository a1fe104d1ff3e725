"""OpenAI GPT-2 weights in the Hugging Face layout, on a tiny checkpoint written here."""

import pytest
import torch

from gptpkg.hf_weights import WeightsError, load_openai_gpt2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("safe", [True, False])
def test_loaded_weights_give_identical_logits(hf_model, tmp_path, safe):
    hf_model.save_pretrained(tmp_path, safe_serialization=safe)
    ours = load_openai_gpt2(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        ref = hf_model(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert ours.tied and ours.cfg.n_heads == 4 and ours.cfg.context_length == 64


def test_missing_or_wrong_files_are_named(hf_model, tmp_path):
    with pytest.raises(WeightsError, match="config.json missing"):
        load_openai_gpt2(tmp_path)
    hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="neither model.safetensors nor pytorch_model.bin"):
        load_openai_gpt2(tmp_path)

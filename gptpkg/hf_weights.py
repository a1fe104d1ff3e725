"""Load OpenAI's GPT-2 weights from local files in the Hugging Face `gpt2` layout.

A folder holding `config.json` and `model.safetensors` (or `pytorch_model.bin`), keys
such as `h.0.attn.c_attn.weight`, optionally prefixed `transformer.`. HF stores these
projections as Conv1D, weight (in, out), so they are transposed into nn.Linear (out, in).
The `weights` stage obtains them (gptpkg.hub): from the Hugging Face Hub or a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import GptpkgError
from .model import GPT
from .presets import ModelConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_MAP = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.c_attn.weight": "attn.qkv.weight",
    "attn.c_attn.bias": "attn.qkv.bias",
    "attn.c_proj.weight": "attn.proj.weight",
    "attn.c_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight",
    "mlp.c_proj.bias": "mlp.proj.bias",
}


class WeightsError(GptpkgError, RuntimeError):
    pass


def weights_file(folder: str | Path) -> Path:
    """The weights file of a Hugging Face gpt2 folder: model.safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    return folder / "model.safetensors" if (folder / "model.safetensors").is_file() else folder / "pytorch_model.bin"


def read_hf_state(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise WeightsError(f"{folder}: config.json missing (expected a Hugging Face gpt2 folder)")
    hf_cfg = json.loads(cfg_file.read_text())
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise WeightsError(f"{folder}: neither model.safetensors nor pytorch_model.bin found")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    return hf_cfg, state


def config_from_hf(hf_cfg: dict, drop_rate: float = 0.0) -> ModelConfig:
    try:
        return ModelConfig.parse(
            dict(
                vocab_size=hf_cfg["vocab_size"],
                context_length=hf_cfg.get("n_positions", hf_cfg.get("n_ctx")),
                emb_dim=hf_cfg["n_embd"],
                n_heads=hf_cfg["n_head"],
                n_layers=hf_cfg["n_layer"],
                drop_rate=drop_rate,
                qkv_bias=True,
                tie_weights=True,
            ),
            "config.json",
        )
    except KeyError as e:
        raise WeightsError(f"config.json lacks GPT-2 key {e}") from None


def load_openai_gpt2(folder: str | Path, drop_rate: float = 0.0) -> GPT:
    """A GPT holding the weights in `folder` exactly."""
    hf_cfg, state = read_hf_state(folder)
    model = GPT(config_from_hf(hf_cfg, drop_rate))
    ours: dict[str, torch.Tensor] = {
        "tok_emb.weight": state["wte.weight"],
        "pos_emb.weight": state["wpe.weight"],
        "final_norm.weight": state["ln_f.weight"],
        "final_norm.bias": state["ln_f.bias"],
    }
    for i in range(model.cfg.n_layers):
        for theirs, mine in _BLOCK_MAP.items():
            key = f"h.{i}.{theirs}"
            if key not in state:
                raise WeightsError(f"{folder}: weight {key!r} missing")
            t = state[key]
            ours[f"blocks.{i}.{mine}"] = t.t().contiguous() if theirs in _CONV1D else t
    ours["out_head.weight"] = ours["tok_emb.weight"]
    expected = model.state_dict()
    for k, v in ours.items():
        if expected[k].shape != v.shape:
            raise WeightsError(f"{folder}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(ours, strict=True)
    model.out_head.weight = model.tok_emb.weight
    return model

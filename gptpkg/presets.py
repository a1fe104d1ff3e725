"""The model architecture (`ModelConfig`) and the one table of model presets."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from .config import ConfigError, Section, key, require


class ModelConfig(Section):
    """GPT-2 architecture. Names follow the book (`emb_dim`, `n_heads`, ...)."""

    vocab_size: int = key("tokens in the vocabulary", 50257, ge=1)
    context_length: int = key("longest input in tokens: rows of the position embedding", 1024, ge=1)
    emb_dim: int = key("width of the embeddings and of every block", 768, ge=1)
    n_heads: int = key("attention heads per block", 12, ge=1)
    n_layers: int = key("transformer blocks", 12, ge=1)
    drop_rate: float = key(
        "dropout of the embeddings, attention weights and residual branches",
        0.0,
        expected="a probability in [0, 1)",
        ge=0,
        lt=1,
    )
    qkv_bias: bool = key("bias terms in the query, key and value projections", True)
    tie_weights: bool = key("the output head shares the token embedding matrix", True)
    vocab_multiple: int = key(
        "pad the embedding and head rows to a multiple of this (64 on GPUs: 50257 -> 50304 makes the head matmul "
        "tile cleanly); 1 = no padding; padded logits are sliced off",
        1,
        ge=1,
    )

    @model_validator(mode="after")
    def _heads_split_the_width(self):
        require(self.emb_dim % self.n_heads == 0, "emb_dim", f"a multiple of n_heads={self.n_heads}", self.emb_dim)
        return self

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m


_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, tie_weights=True)

# The one preset table. OpenAI's four sizes, then small presets that train on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    "cpu-small": dict(_GPT2, context_length=256, emb_dim=256, n_layers=6, n_heads=8),
    "cpu-mini": dict(_GPT2, context_length=256, emb_dim=128, n_layers=4, n_heads=4),
    "tiny": dict(_GPT2, context_length=128, emb_dim=32, n_layers=2, n_heads=2),
}

# Known parameter counts (tied head), checked by the tests.
KNOWN_PARAM_COUNTS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset named `preset`, with `overrides` (e.g. `drop_rate=0.1`) applied."""
    if preset not in PRESETS:
        raise ConfigError(f"model preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    return ModelConfig.parse({**PRESETS[preset], **overrides}, f"model preset {preset!r}")

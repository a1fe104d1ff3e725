"""The `weights` stage: OpenAI's GPT-2 weights for the fine-tunings that start from them
(init: openai), from the Hugging Face Hub or a local folder, verified (gptpkg.hub)."""

from __future__ import annotations

from ..config import WeightsConfig
from ..hub import obtain_weights


def run(cfg: WeightsConfig, ctx) -> dict:
    return obtain_weights(ctx.paths.openai_weights, cfg.model, cfg.revision, cfg.local_folder)

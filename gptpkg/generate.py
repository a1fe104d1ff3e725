"""Text generation: greedy, temperature and top-k sampling, stop at the end token,
with a KV cache (prefill once, then one position per step)."""

from __future__ import annotations

import torch

from .model import GPT, KVCache


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend `idx` (B, T) by up to `max_new_tokens`. temperature 0 = greedy. Stops when
    every row has produced `eos_id` (rows that finished early are padded with it).
    Sampling draws from `generator`, so a seeded generator gives repeatable text."""
    was_training = model.training
    model.eval()
    ctx = model.cfg.context_length
    cache = KVCache(model.cfg.n_layers) if use_cache else None
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    step_input = idx
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + step_input.shape[1] > ctx:
            # Window full: re-prefill the last ctx tokens, exactly what the uncached
            # path sees (positions restart at 0 once the window slides).
            cache = KVCache(model.cfg.n_layers)
            step_input = idx[:, -ctx:]
        if cache is None:
            step_input = idx[:, -ctx:]
        logits = model(step_input, cache)[:, -1, :]  # (B, V)
        next_id = _pick(logits, temperature, top_k, generator)
        if eos_id is not None:
            next_id = torch.where(done[:, None], torch.full_like(next_id, eos_id), next_id)
            done |= next_id[:, 0] == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        step_input = next_id
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return idx


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, **kw) -> str:
    """Prompt in, completion (without the prompt) out."""
    from .tokenizer import END_OF_TEXT, EOT_ID

    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt, allowed_special={END_OF_TEXT})], device=device)
    ids = ids[:, -model.cfg.context_length :]
    out = generate(model, ids, max_new_tokens, eos_id=kw.pop("eos_id", EOT_ID), **kw)
    new = out[0, ids.shape[1] :].tolist()
    if EOT_ID in new:
        new = new[: new.index(EOT_ID)]
    return tokenizer.decode(new)

"""Text generation: greedy, temperature and top-k sampling, stop at the end token,
with a KV cache (prefill once, then one position per step). Against repetition loops
("the formula for the formula for ..."), a repetition penalty and a no-repeat n-gram
rule act on the generated tokens (not the prompt, which an answer may quote).

Three caches (`kv_cache`): `dynamic` grows its tensors every step; `static` writes into
buffers allocated once (`StaticKVCache`), so every decode step has the same shapes;
`compiled` is `static` with the decode step compiled by torch.compile, on CUDA with
CUDA graphs (mode reduce-overhead: one graph replay per token instead of hundreds of
kernel launches). All three give the same tokens as no cache at temperature 0.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch

from .model import GPT, KVCache, StaticKVCache

KV_CACHES = ("dynamic", "static", "compiled")


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
    repetition_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
    kv_cache: Literal["dynamic", "static", "compiled"] = "dynamic",
) -> torch.Tensor:
    """Extend `idx` (B, T) by up to `max_new_tokens`. temperature 0 = greedy. Stops when
    every row has produced `eos_id` (rows that finished early are padded with it).
    Sampling draws from `generator`, so a seeded generator gives repeatable text.
    `repetition_penalty` > 1 divides the positive logits (multiplies the negative ones)
    of tokens already generated (CTRL's rule); `no_repeat_ngram` n >= 1 forbids a token
    that would repeat a generated n-gram. 1.0 and 0 leave the logits untouched.
    `kv_cache` picks the cache when `use_cache` (see the module docstring)."""
    if repetition_penalty <= 0 or no_repeat_ngram < 0:
        raise ValueError(
            f"repetition_penalty: expected > 0 (1 = off), got {repetition_penalty}; "
            f"no_repeat_ngram: expected >= 0 (0 = off), got {no_repeat_ngram}"
        )
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    was_training = model.training
    model.eval()
    ctx = model.cfg.context_length
    static = use_cache and kv_cache != "dynamic"
    step = _decode_step(model, idx.device) if use_cache and kv_cache == "compiled" else model
    cache, length = None, 0  # length: positions in the cache, counted on the host
    if use_cache:
        cache = _static_cache(model, idx, ctx) if static else KVCache(model.cfg.n_layers)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    step_input = idx
    start = idx.shape[1]
    for _ in range(max_new_tokens):
        if cache is not None and length + step_input.shape[1] > ctx:
            # Window full: re-prefill the last ctx tokens, exactly what the uncached
            # path sees (positions restart at 0 once the window slides).
            length = 0
            if static:
                cache.reset()
            else:
                cache = KVCache(model.cfg.n_layers)
            step_input = idx[:, -ctx:]
        if cache is None:
            step_input = idx[:, -ctx:]
        # The compiled step takes one token per row (fixed shapes); a prefill runs eager.
        run = step if step_input.shape[1] == 1 else model
        logits = run(step_input, cache=cache)[:, -1, :]  # (B, V)
        length += step_input.shape[1]
        if repetition_penalty != 1.0 or no_repeat_ngram > 0:
            logits = _discourage_repeats(logits.float(), idx[:, start:], repetition_penalty, no_repeat_ngram)
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


def _discourage_repeats(logits: torch.Tensor, generated: torch.Tensor, penalty: float, ngram: int) -> torch.Tensor:
    """logits (B, V) after the repetition penalty and the no-repeat n-gram ban, given the
    tokens generated so far (B, t)."""
    if penalty != 1.0 and generated.shape[1]:
        seen = logits.gather(1, generated)
        logits = logits.scatter(1, generated, torch.where(seen > 0, seen / penalty, seen * penalty))
    t = generated.shape[1]
    if ngram > 0 and t >= ngram:
        rows = generated.tolist()
        for b, row in enumerate(rows):
            prefix = row[t - ngram + 1 :]  # the last n-1 tokens: an n-gram is one token away
            banned = {row[i + ngram - 1] for i in range(t - ngram + 1) if row[i : i + ngram - 1] == prefix}
            if banned:
                logits[b, list(banned)] = float("-inf")
    return logits


# One static cache per model, reused by later calls of the same batch size: a compiled
# step with CUDA graphs replays on the same buffers instead of recording new graphs.
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECODE_STEPS: dict[str, object] = {}


def _static_cache(model: GPT, idx: torch.Tensor, max_len: int) -> StaticKVCache:
    dtype = next(model.parameters()).dtype
    cache = _STATIC_CACHES.get(model)
    fits = cache is not None and (cache.batch_size, cache.max_len, cache.dtype) == (idx.shape[0], max_len, dtype)
    if not fits or cache.pos.device != idx.device:
        cache = StaticKVCache(model.cfg, idx.shape[0], max_len, idx.device, dtype)
        if idx.device.type == "cuda":
            for t in cache.tensors():  # fixed addresses: CUDA graphs may write them in place
                torch._dynamo.mark_static_address(t)
        _STATIC_CACHES[model] = cache
    cache.reset()
    return cache


def _decode(model: GPT, token: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    return model(token, cache=cache)


def _decode_step(model: GPT, device: torch.device):
    """(token, cache) -> model(token, cache=cache), compiled: CUDA graphs on CUDA (mode
    reduce-overhead), the default inductor compile elsewhere. One compiled function per
    device type (its graphs are keyed by the model and the cache's shapes)."""
    if device.type not in _DECODE_STEPS:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _DECODE_STEPS[device.type] = torch.compile(_decode, mode=mode, fullgraph=True)
    compiled = _DECODE_STEPS[device.type]

    def step(token: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        if device.type == "cuda":  # the previous step's logits are consumed: its graph may rerun
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, token, cache)

    return step


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

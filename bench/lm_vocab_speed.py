"""Pretraining steps with the softmax over every GPT-2 token against over the corpus's
tokens only (`pretrain.lm_vocab: full | corpus`), side by side.

    PYTHONPATH=. python bench/lm_vocab_speed.py --workspace DIR [--json OUT.json]

DIR is a pipeline workspace whose `prepare` stage has run (its data/processed/corpus: e.g.
`bench/pipeline_time.py --keep DIR`). With this repository's pretrain params (model
preset, corpus, max_length, batch size, dropout, optimizer; `--params` for others), each
repetition builds the model from the same seed twice, once per setting, and times
`--steps` training steps (forward, backward, clipping, AdamW) on the same consecutive
windows of the corpus; the two settings alternate (full, corpus, full, corpus, ...) so
both see the same machine. Prints the medians of tokens/s and of the per-repetition
ratio, and the worst repetition's ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpkg.config import load_params, model_config  # noqa: E402
from gptpkg.data import TokenWindows  # noqa: E402
from gptpkg.model import GPT  # noqa: E402
from gptpkg.perf import keep_freed_memory  # noqa: E402
from gptpkg.stages import PretrainConfig, paths_of, read_corpus, stage_config  # noqa: E402
from gptpkg.train import make_optimizer  # noqa: E402


def steps_per_s(cfg: PretrainConfig, train, windows: TokenWindows, vocab: list[int] | None,
                warmup: int, steps: int) -> float:
    torch.manual_seed(train.seed)
    model = GPT(model_config(cfg.model, drop_rate=cfg.drop_rate, vocab_multiple=cfg.vocab_multiple))
    model.set_lm_vocab(vocab)
    model.train()
    opt = make_optimizer(model, train, torch.device("cpu"))
    B = train.batch_size
    t0 = 0.0
    for s in range(warmup + steps):
        if s == warmup:
            t0 = time.perf_counter()
        items = [windows[(s * B + i) % len(windows)] for i in range(B)]
        x = torch.stack([it["input_ids"] for it in items])
        y = torch.stack([it["targets"] for it in items])
        loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, help="a pipeline folder whose prepare stage has run")
    p.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    p.add_argument("--steps", type=int, default=30, help="timed training steps per repetition and setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training stages run
    ws = Path(args.workspace).resolve()
    params = load_params(args.params)
    params["paths"] = {k: str(ws / v) for k, v in params["paths"].items()}
    cfg, train = stage_config(params, "pretrain", PretrainConfig)
    paths = paths_of(params)
    train_ids, val_ids = read_corpus(paths, cfg.corpus, "train"), read_corpus(paths, cfg.corpus, "val")
    vocab = np.union1d(train_ids, val_ids).tolist()
    full = model_config(cfg.model).vocab_size
    windows = TokenWindows(train_ids, cfg.max_length, cfg.stride)
    train = replace(train, device="cpu")
    tokens_per_step = train.batch_size * cfg.max_length
    rates: dict[str, list[float]] = {"full": [], "corpus": []}
    ratios = []
    for rep in range(args.reps):
        for name, v in (("full", None), ("corpus", vocab)):
            rates[name].append(steps_per_s(cfg, train, windows, v, args.warmup, args.steps) * tokens_per_step)
        ratios.append(rates["corpus"][-1] / rates["full"][-1])
        print(f"rep {rep}: full {rates['full'][-1]:,.0f} tokens/s, corpus {rates['corpus'][-1]:,.0f} tokens/s, "
              f"{ratios[-1]:.2f}x", flush=True)
    out = {
        "model": cfg.model, "corpus": cfg.corpus, "batch_size": train.batch_size, "max_length": cfg.max_length,
        "threads": torch.get_num_threads(), "steps": args.steps, "reps": args.reps,
        "vocab_full": full, "vocab_corpus": len(vocab),
        "tokens_per_s_full": rates["full"], "tokens_per_s_corpus": rates["corpus"],
        "median_tokens_per_s_full": statistics.median(rates["full"]),
        "median_tokens_per_s_corpus": statistics.median(rates["corpus"]),
        "median_ratio": statistics.median(ratios), "worst_ratio": min(ratios),
    }
    print(f"{cfg.model}, corpus {cfg.corpus}: softmax over {len(vocab):,} tokens instead of {full:,}; "
          f"median {out['median_tokens_per_s_full']:,.0f} -> {out['median_tokens_per_s_corpus']:,.0f} tokens/s, "
          f"median ratio {out['median_ratio']:.2f}x (worst rep {out['worst_ratio']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

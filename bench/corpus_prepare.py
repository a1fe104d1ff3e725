"""Pretraining on a corpus of your own: what `prepare` and `pretrain` cost as it grows.

Side by side in one run, on a synthetic corpus made from the mirrored texts (their
paragraphs shuffled into documents of ~500 KB, one .txt file each):

- tokens/s of prepare's tokenization (`gptpkg.corpus`: workers, cache, shards) at 1, 2
  and all workers, against tiktoken's single-thread `encode_ordinary` on the same text;
- peak RSS of that prepare and of 20 pretrain steps (cpu-mini, memory-mapped shards) at
  two corpus sizes;
- the loader's windows/s (a window read from the shards + the batch collate) against
  what a training step consumes on this CPU.

Every measurement runs in a fresh subprocess (its own peak RSS). Figures, not pass/fail:

    python bench/corpus_prepare.py --sizes 50 200 --out bench/results/corpus_prepare.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data"


def make_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    """Files of shuffled paragraphs of the mirrored texts, `megabytes` in all; bytes written."""
    paras = []
    for name in ("tinyshakespeare.txt", "the-verdict.txt"):
        paras += [p for p in (MIRROR / name).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, n = 0, 0
    while total < megabytes * 1_000_000:
        doc, size = [], 0
        while size < 500_000:
            p = rng.choice(paras)
            doc.append(p)
            size += len(p) + 2
        data = "\n\n".join(doc).encode()
        (folder / f"doc{n:05d}.txt").write_bytes(data)
        total, n = total + len(data), n + 1
    return total


def peak_rss_mb() -> float:
    """Peak RSS of this process, and the largest of its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1), round(own / 1024, 1)


def child_prepare(folder: str, work: str, workers: int) -> dict:
    from gptpkg.corpus import Unit, corpus_files, tokenize_units, write_shards
    from gptpkg.shards import write_manifest

    units = [Unit(f.name, path=str(f)) for f in corpus_files(folder)]
    t0 = time.perf_counter()
    records = tokenize_units(units, Path(work) / "cache", workers, str(MIRROR))
    t1 = time.perf_counter()
    out = Path(work) / "shards"
    out.mkdir()
    entry = write_shards(out, "corpus", records, Path(work) / "cache", 0.1, 50_000_000)
    write_manifest(out, {"corpus": entry}, 50_000_000)
    t2 = time.perf_counter()
    tokens = entry["train"]["tokens"] + entry["val"]["tokens"]
    worst, own = peak_rss_mb()
    return {
        "tokens": tokens,
        "tokenize_s": t1 - t0,
        "shards_s": t2 - t1,
        "tokens_per_s": tokens / (t2 - t0),
        "peak_rss_mb_worker": worst,
        "peak_rss_mb_main": own,
    }


def child_encode(folder: str) -> dict:
    from gptpkg.tokenizer import get_tokenizer

    tok = get_tokenizer(MIRROR)
    files = sorted(Path(folder).iterdir())
    n, t = 0, 0.0
    for f in files:
        text = f.read_text(encoding="utf-8")
        t0 = time.perf_counter()
        n += len(tok.encode_ordinary(text))
        t += time.perf_counter() - t0
    return {"tokens": n, "tokens_per_s": n / t, "mb_per_s": sum(f.stat().st_size for f in files) / t / 1e6}


def child_pretrain(shards: str, steps: int, preset: str = "", max_length: int = 0) -> dict:
    import torch

    from gptpkg.config import PretrainConfig
    from gptpkg.data import TokenWindows
    from gptpkg.model import GPT
    from gptpkg.shards import split_stream
    from gptpkg.stages.pretrain import _collate
    from gptpkg.train import Task, fit, lm_loss, plan_run

    params = ROOT / "params.yaml"
    import yaml

    section = yaml.safe_load(params.read_text())["pretrain"]
    section = {**section, "max_steps": steps, "eval_every": 0, "epochs": 1.0}
    if preset:  # the GPU part: bench/gpu_check.sh
        section.update(model=preset, max_length=max_length, stride=max_length, vocab_multiple=64, batch_size=16)
    cfg = PretrainConfig.parse(section, "pretrain")
    windows = TokenWindows(split_stream(shards, ["corpus"], "train"), cfg.max_length, cfg.stride)
    # the loader alone: random windows + collate, batches of batch_size
    rng, reads = random.Random(0), []
    for _ in range(5):
        idx = [[rng.randrange(len(windows)) for _ in range(cfg.batch_size)] for _ in range(200)]
        t0 = time.perf_counter()
        for b in idx:
            _collate([windows[i] for i in b])
        reads.append(200 * cfg.batch_size / (time.perf_counter() - t0))
    model = GPT(cfg.architecture())
    plan = plan_run(cfg, model, windows, _collate)
    t0 = time.perf_counter()
    result = fit(model, plan, Task(windows, lm_loss), None)
    step_s = (time.perf_counter() - t0) / result.steps
    worst, own = peak_rss_mb()
    speed = {}
    if plan.device.type == "cuda":
        from gptpkg.perf import training_mfu

        speed = training_mfu(model.cfg, cfg.max_length, [], result.tokens_per_s, torch.cuda.get_device_name())
    load_s = cfg.batch_size / statistics.median(reads)
    return {
        **speed,
        "device": str(plan.device),
        # the loader runs in the training loop's thread: its time per batch is time the step waits
        "data_wait_share": load_s / step_s,
        "windows": len(windows),
        "loader_windows_per_s": statistics.median(reads),
        "step_windows_per_s": cfg.batch_size / step_s,
        "step_s": step_s,
        "peak_rss_mb": own,
    }


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 500], help="corpus sizes in MB (first: throughput)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2 and every core")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--preset", default="", help="pretrain this preset (GPU part), else params.yaml's")
    ap.add_argument("--max-length", type=int, default=1024, help="window length with --preset")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        fn = {"prepare": child_prepare, "encode": child_encode, "pretrain": child_pretrain}[kind]
        print(json.dumps(fn(*(int(x) if x.isdigit() else x for x in rest))))
        return
    from gptpkg.corpus import default_workers

    cores = default_workers()
    workers = a.workers or sorted({1, 2, cores})
    results: dict = {"cores": cores, "load_avg_at_start": os.getloadavg()[0], "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mb in enumerate(a.sizes):
            folder = Path(tmp) / f"corpus{mb}"
            size = make_corpus(folder, mb)
            row: dict = {"bytes": size}
            if i == 0:
                row["encode_ordinary_1_thread"] = run_child("encode", str(folder))
            for w in workers if i == 0 else [max(workers)]:
                work = Path(tmp) / f"work{mb}-{w}"
                work.mkdir()
                r = run_child("prepare", str(folder), str(work), str(w))
                if i == 0:
                    r["vs_single_thread_x_workers"] = r["tokens_per_s"] / (
                        w * row["encode_ordinary_1_thread"]["tokens_per_s"]
                    )
                row[f"prepare_workers_{w}"] = r
            extra = (a.preset, str(a.max_length)) if a.preset else ()
            row["pretrain"] = run_child("pretrain", str(work / "shards"), str(a.steps), *extra)
            results["sizes"][mb] = row
            print(json.dumps({mb: row}, indent=1), flush=True)
    results["load_avg_at_end"] = os.getloadavg()[0]
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

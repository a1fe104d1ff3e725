"""Latency per text at batch 1 and throughput at batch 32: PyTorch eager vs ONNX Runtime
fp32 vs ONNX Runtime int8, same model, same token ids, one process, measured side by side
(the three engines take turns within each repeat; medians over repeats).

    GPTPKG_DATA_MIRROR=../shared/data PYTHONPATH=. python bench/bench_inference.py [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build, sms_texts  # noqa: E402

from gptpkg.onnx_classifier import FP32_FILE, INT8_FILE, OnnxSpamClassifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained classifier checkpoint (default: fresh cpu-mini)")
    ap.add_argument("--model-dir", help="where to export (default: a temp folder)")
    ap.add_argument("--texts", type=int, default=256, help="SMS texts measured per engine and repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for torch and ORT alike (1: on a shared, busy machine more "
        "threads measure the scheduler; see the load average printed)",
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    folder = Path(args.model_dir or tempfile.mkdtemp(prefix="gptpkg-bench-"))
    model, folder = build(folder, args.checkpoint)
    fp32 = OnnxSpamClassifier(folder / FP32_FILE, device="cpu", threads=args.threads)
    int8 = OnnxSpamClassifier(folder / INT8_FILE, device="cpu", threads=args.threads)
    ids = [fp32.encode(t) for t in sms_texts(args.texts)]
    batches1 = [fp32.pad([r]) for r in ids]
    batches32 = [fp32.pad(ids[i : i + 32]) for i in range(0, len(ids), 32)]

    @torch.no_grad()
    def torch_run(x, n):
        return model(torch.from_numpy(x), torch.from_numpy(n)).numpy()

    engines = {"pytorch_eager": torch_run, "onnxruntime_fp32": fp32.logits, "onnxruntime_int8": int8.logits}
    for run in engines.values():  # warm-up (allocators, ORT's first-run shape work)
        for b in batches1[:8] + batches32[:2]:
            run(*b)
    agree = {
        k: float((run(*batches32[0]).argmax(1) == torch_run(*batches32[0]).argmax(1)).mean())
        for k, run in engines.items()
    }
    lat = {k: [] for k in engines}
    thr = {k: [] for k in engines}
    for _ in range(args.repeats):
        for name, run in engines.items():
            per = []
            for b in batches1:
                t0 = time.perf_counter()
                run(*b)
                per.append(time.perf_counter() - t0)
            lat[name].append(statistics.median(per) * 1e3)
            t0 = time.perf_counter()
            for b in batches32:
                run(*b)
            thr[name].append(len(ids) / (time.perf_counter() - t0))
    tokens = [len(r) for r in ids]
    result = {
        "model": args.checkpoint or "cpu-mini (fresh)",
        "threads": args.threads,
        "texts": len(ids),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "median_tokens_per_text": statistics.median(tokens),
        "repeats": args.repeats,
        "fp32_mb": round((folder / FP32_FILE).stat().st_size / 2**20, 2),
        "int8_mb": round((folder / INT8_FILE).stat().st_size / 2**20, 2),
        "engines": {
            k: {
                "latency_ms_batch1_median": round(statistics.median(lat[k]), 3),
                "throughput_texts_per_s_batch32_median": round(statistics.median(thr[k]), 1),
                "label_agreement_with_pytorch": agree[k],
            }
            for k in engines
        },
    }
    base = result["engines"]["pytorch_eager"]
    print(
        f"model {result['model']}, {len(ids)} SMS texts (median {result['median_tokens_per_text']} tokens), "
        f"{args.threads} threads, median of {args.repeats} repeats, load average {result['load_average_1m']} "
        f"on {result['cpus']} CPUs"
    )
    print(
        "| engine | latency/text, batch 1 (ms) | throughput, batch 32 (texts/s) | vs PyTorch (latency / throughput) |"
    )
    print("|---|---:|---:|---:|")
    for k, v in result["engines"].items():
        print(
            f"| {k} | {v['latency_ms_batch1_median']:.2f} | {v['throughput_texts_per_s_batch32_median']:.0f} | "
            f"{base['latency_ms_batch1_median'] / v['latency_ms_batch1_median']:.2f}x / "
            f"{v['throughput_texts_per_s_batch32_median'] / base['throughput_texts_per_s_batch32_median']:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

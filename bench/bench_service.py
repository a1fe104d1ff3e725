"""The spam service under a bounded local load, adaptive batching on vs off.

For each mode: start `bentoml serve` on 127.0.0.1 (a free port) with the same exported
model, wait for /readyz, warm up, then run CLIENTS concurrent clients (one asyncio
process, httpx) for DURATION seconds, each sending POST /classify with one SMS text per
request, back to back. Reports requests/s, p50/p99 latency and errors (non-200 or
transport errors); then stops the server. Traffic goes to 127.0.0.1 only and every loop
ends by itself.

    GPTPKG_DATA_MIRROR=../shared/data PYTHONPATH=. python bench/bench_service.py [--variant int8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build, sms_texts  # noqa: E402

from gptpkg.onnx_classifier import FP32_FILE, INT8_FILE  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_file: Path, batching: bool, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "GPTPKG_MODEL_PATH": str(model_file),
        "GPTPKG_BATCHING": "on" if batching else "off",
        "GPTPKG_MAX_BATCH_SIZE": str(args.max_batch_size),
        "GPTPKG_MAX_LATENCY_MS": str(args.max_latency_ms),
        "GPTPKG_ORT_THREADS": str(args.ort_threads),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONPATH": str(ROOT),
    }
    bentoml = str(Path(sys.executable).parent / "bentoml")
    proc = subprocess.Popen(
        [bentoml, "serve", "serving.service:SpamClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit("server not ready in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def load(url: str, texts: list[str], clients: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + duration

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        k = i
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/classify", json={"texts": [texts[k % len(texts)]]})
                ok = r.status_code == 200 and len(r.json()) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            k += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 2),
        "req_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(q[49] * 1e3, 1),
        "p99_ms": round(q[98] * 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained classifier checkpoint (default: fresh cpu-mini)")
    ap.add_argument("--model-dir", help="exported model folder to use or create (default: a temp folder)")
    ap.add_argument("--variant", choices=["fp32", "int8"], default="fp32")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument(
        "--max-latency-ms",
        type=int,
        default=5000,
        help="batcher queue bound; a request that would wait longer gets a 503",
    )
    ap.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime intra-op threads in the server")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.duration <= 600):
        raise SystemExit("--clients 1..256 and --duration up to 600 s: a bounded load")

    _, folder = build(Path(args.model_dir or tempfile.mkdtemp(prefix="gptpkg-bench-")), args.checkpoint)
    model_file = folder / (FP32_FILE if args.variant == "fp32" else INT8_FILE)
    texts = sms_texts(1000)
    results = {}
    for batching in (True, False):
        proc, url = start_server(model_file, batching, args)
        try:
            asyncio.run(load(url, texts, args.clients, 3.0))  # warm-up
            results["on" if batching else "off"] = asyncio.run(load(url, texts, args.clients, args.duration))
            results["on" if batching else "off"]["load_average_1m"] = round(os.getloadavg()[0], 2)
        finally:
            stop_server(proc)
    print(
        f"{args.variant} model, {args.clients} concurrent clients x {args.duration:.0f} s, one text per request, "
        f"max_batch_size {args.max_batch_size}, max_latency_ms {args.max_latency_ms}, {args.ort_threads} ORT thread(s), "
        f"client and server on the same {os.cpu_count()} CPUs"
    )
    print("| adaptive batching | requests/s | p50 (ms) | p99 (ms) | errors | load average (1 min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
            f"{r['load_average_1m']} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"variant": args.variant, "clients": args.clients, "duration_s": args.duration, "results": results},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

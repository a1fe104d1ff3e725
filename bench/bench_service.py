"""The spam service against a minimal peer and the in-process limit, side by side.

One run, one exported model file, four contenders:
- service: `bentoml serve serving.service:SpamClassifier` with its shipped defaults (only
  GPTPKG_MODEL_PATH is set; `--env KEY=VALUE` adds settings for lever studies);
- service-metrics-off: the same with GPTPKG_METRICS=off, so the cost of the Prometheus
  metrics (on by default) is measured in the same run: the JSON's "metrics_cost" holds
  the service / service-metrics-off ratios of each repeat and their medians;
- peer: bench/peer_server.py, a Starlette app under uvicorn (2 workers, ONNX Runtime 1
  thread, predict inline in the async handler), the same /classify contract;
- in-process: `OnnxSpamClassifier.predict` without HTTP in 2 processes, 1 text per call
  and 32 length-sorted texts per call: the throughput this machine allows.

Load comes from `wrk` (1 thread, closed loop, keep-alive) running a Lua script that POSTs
/classify bodies of real SMS texts: 1, 8 and 32 connections with one text per request,
and 8 connections with 16 texts per request. In each repeat all servers start on
127.0.0.1 (free ports) and are warmed up; then each load runs against each server in
turn (the order flips from load to load and from repeat to repeat), so the contenders of
one load are measured seconds apart on a machine whose load changes; the idle ones wait.
The table shows medians over repeats. Server CPU is utime+stime of the server's process
tree during a load: in cores, in ms per request, and the share of it spent in the busiest
process (how evenly the workers share the connections). wrk's own CPU is in the JSON
(client_cpu_cores).

    GPTPKG_DATA_MIRROR=../shared/data PYTHONPATH=. python bench/bench_service.py [--quick]

`--contract SECONDS` instead runs schemathesis (`st run URL/docs.json --checks all`) for
that long against the service (shipped defaults plus `--env`) and reports its failures:
the OpenAPI spec against what the server answers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path[:0] = [str(BENCH), str(ROOT / "tests")]
from bench_model import build, sms_texts  # noqa: E402
from helpers import free_port, stop_group, wait_ready  # noqa: E402

from gptpkg.onnx_classifier import FP32_FILE, INT8_FILE, OnnxSpamClassifier  # noqa: E402

LOADS = ((1, 1), (8, 1), (32, 1), (8, 16))  # (connections, texts per request)
SERVERS = ("service", "service-metrics-off", "peer")
LIMITS = {"batch 1": 1, "batch 32, length-sorted": 32}  # in-process: texts per call
LUA = r"""
local reqs, n, i, threads = {}, 0, 0, {}
statuses = {}  -- per thread: {status: count} of the non-2xx responses
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  for body in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format("POST", "/classify", {["Content-Type"] = "application/json"}, body)
  end
end
function request()
  i = i % n + 1
  return reqs[i]
end
function response(status, headers, body)
  if status < 200 or status > 299 then statuses[status] = (statuses[status] or 0) + 1 end
end
function done(summary, latency, requests)
  local e, counts = summary.errors, {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      table.insert(counts, string.format('"%d": %d', status, count))
    end
  end
  io.write(string.format('RESULT {"responses": %d, "duration_s": %.6f, "socket_errors": %d, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "statuses": {%s}}\n', summary.requests,
    summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, table.concat(counts, ", ")))
end
"""


def start_server(kind: str, model_file: Path, extra_env: dict[str, str], log: Path):
    """(process, base url) of a ready server; SystemExit with its log when it fails to start."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTPKG_") or k == "GPTPKG_DATA_MIRROR"}
    env.update(
        GPTPKG_MODEL_PATH=str(model_file),
        BENTOML_DO_NOT_TRACK="true",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if kind.startswith("service"):
        env.update(extra_env)
        if kind == "service-metrics-off":
            env["GPTPKG_METRICS"] = "off"
        bentoml = str(Path(sys.executable).parent / "bentoml")
        argv = [bentoml, "serve", "serving.service:SpamClassifier", "--host", "127.0.0.1", "--port", str(port)]
    else:
        argv = [sys.executable, str(BENCH / "peer_server.py"), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url + "/readyz")
    except RuntimeError as e:
        stop_group(proc)
        raise SystemExit(f"{kind}: {e}; its output ({log}):\n{log.read_text()[-4000:]}") from None
    return proc, url


def tree_cpu_s(pid: int) -> dict[int, float]:
    """{pid: user+system CPU seconds} of `pid` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wrk(url: str, bodies: Path, connections: int, duration: int, script: Path) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script), url]
    r = subprocess.run([*argv, "--", str(bodies)], capture_output=True, text=True, timeout=duration + 60)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return json.loads(line.removeprefix("RESULT "))


def load_run(proc, url: str, bodies: Path, connections: int, per_request: int, duration: int, script: Path) -> dict:
    """One wrk load on a running server, with the server's and the client's CPU."""
    cpu0, client0, t0 = tree_cpu_s(proc.pid), children_cpu_s(), time.monotonic()
    r = wrk(url, bodies, connections, duration, script)
    cpu1, client1, wall = tree_cpu_s(proc.pid), children_cpu_s(), time.monotonic() - t0
    non_2xx = sum(r["statuses"].values())
    ok = r["responses"] - non_2xx
    per_pid = [s - cpu0.get(pid, 0.0) for pid, s in cpu1.items()]
    return {
        **r,
        "req_per_s": round(ok / r["duration_s"], 1),
        "texts_per_s": round(ok * per_request / r["duration_s"], 1),
        "non_2xx": non_2xx,
        "errors": non_2xx + r["socket_errors"],
        "server_cpu_cores": round(sum(per_pid) / wall, 2),
        "server_cpu_ms_per_req": round(1e3 * sum(per_pid) / max(r["responses"], 1), 2),
        "busiest_process_cpu_share": round(max(per_pid) / max(sum(per_pid), 1e-9), 2),
        "client_cpu_cores": round((client1 - client0) / wall, 2),
    }


def _limit_worker(model_file: str, texts: list[str], per_call: int, duration: float, barrier, results) -> None:
    clf = OnnxSpamClassifier(model_file, device="cpu", threads=1)
    ordered = sorted(texts, key=lambda t: len(clf.encode(t))) if per_call > 1 else texts
    calls = [ordered[i : i + per_call] for i in range(0, len(ordered), per_call)]
    for c in calls[:20]:  # warm-up
        clf.predict(c, batch_size=per_call)
    barrier.wait()
    done, k, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        clf.predict(calls[k % len(calls)], batch_size=per_call)
        done, k = done + len(calls[k % len(calls)]), k + 1
    results.put(done / (time.perf_counter() - t0))


def in_process_limit(model_file: Path, texts: list[str], per_call: int, duration: float, processes: int = 2) -> dict:
    """texts/s of `processes` processes, each classifying `per_call` texts per call, no HTTP."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_limit_worker, args=(str(model_file), texts, per_call, duration, barrier, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    rates = [results.get(timeout=duration + 300) for _ in procs]
    for p in procs:
        p.join()
    return {"texts_per_s": round(sum(rates), 1), "processes": processes, "texts_per_call": per_call}


def medians(runs: list[dict]) -> dict:
    return {
        k: round(statistics.median(r[k] for r in runs), 2) for k, v in runs[0].items() if isinstance(v, int | float)
    }


def metrics_cost(runs: dict) -> dict:
    """Per load: service / service-metrics-off for req/s and CPU ms per request, one ratio
    per repeat (the two ran seconds apart, on much the same machine state) and the median."""
    out = {}
    for key in runs["service"]:
        pairs = list(zip(runs["service"][key], runs["service-metrics-off"][key]))
        cost = {}
        for field in ("req_per_s", "server_cpu_ms_per_req", "p99_ms"):
            ratios = [round(on[field] / off[field], 3) for on, off in pairs if off[field]]
            cost[field] = {"median": round(statistics.median(ratios), 3) if ratios else None, "repeats": ratios}
        out[key] = cost
    return out


def table(res: dict) -> str:
    rows = [
        "| server | connections | texts/request | req/s | texts/s | p50 ms | p99 ms | max ms | errors "
        "| server CPU cores | CPU ms/req | busiest process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in res["servers"]:
        for key, m in res["median"][server].items():
            c, k = key.split("x")
            rows.append(
                f"| {server} | {c} | {k} | {m['req_per_s']:.0f} | {m['texts_per_s']:.0f} | {m['p50_ms']:.1f} | "
                f"{m['p99_ms']:.1f} | {m['max_ms']:.1f} | {m['errors']:.0f} | {m['server_cpu_cores']:.2f} | "
                f"{m['server_cpu_ms_per_req']:.2f} | {m['busiest_process_cpu_share']:.0%} |"
            )
    for name, m in res["median"].get("in-process", {}).items():
        rows.append(f"| in-process, 2 processes, {name} | — | — | — | {m['texts_per_s']:.0f} | | | | | | | |")
    med = res["median"]
    notes = []
    if {"service", "peer"} <= med.keys():
        s, p = med["service"]["32x1"], med["peer"]["32x1"]
        notes.append(f"service / peer at 32 connections: {s['req_per_s'] / p['req_per_s']:.2f}x req/s")
    for key, cost in res.get("metrics_cost", {}).items():
        c, k = key.split("x")
        r, cpu = cost["req_per_s"], cost["server_cpu_ms_per_req"]
        notes.append(
            f"metrics on / off, {c} connections x {k} texts: {r['median']:.2f}x req/s (repeats {r['repeats']}), "
            f"{cpu['median']:.2f}x CPU ms/request"
        )
    if "in-process" in med:
        limit = med["in-process"]["batch 32, length-sorted"]["texts_per_s"]
        for server in res["servers"]:
            share = med[server]["8x16"]["texts_per_s"] / limit
            notes.append(f"{server}, 8 x 16 texts: {share:.0%} of the in-process length-sorted limit")
    return "\n".join(rows + [""] + [f"- {n}" for n in notes])


def contract(model_file: Path, extra_env: dict[str, str], seconds: int, out: Path) -> None:
    """schemathesis, every check, for `seconds` against a started service; SystemExit(1)
    when it reports a failure."""
    st = Path(sys.executable).parent / "schemathesis"
    if not st.is_file():
        raise SystemExit(f"{st}: not found (schemathesis is in the dev extra: pip install -e '.[dev]')")
    with tempfile.TemporaryDirectory(prefix="gptpkg-contract-") as tmp:
        log = Path(tmp) / "service.log"
        proc, url = start_server("service", model_file, extra_env, log)
        try:
            argv = [str(st), "run", f"{url}/docs.json", "--url", url, "--checks", "all", "--max-time", str(seconds)]
            argv += ["--generation-database", "none", "--no-color"]
            t0 = time.monotonic()
            r = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=seconds + 300)
            wall = time.monotonic() - t0
        finally:
            stop_group(proc)
    print(r.stdout[-8000:], r.stderr[-2000:], sep="\n")
    summary = [line.strip() for line in r.stdout.splitlines() if "generated" in line or line.startswith("Seed:")]
    res = {
        "commit": commit(),
        "model_file": str(model_file),
        "service_env": extra_env,
        "max_time_s": seconds,
        "wall_s": round(wall, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "schemathesis_exit_code": r.returncode,
        "summary": summary,
        "command": " ".join(["schemathesis", "run", "URL/docs.json", "--url", "URL", *argv[5:]]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['commit']}: schemathesis exit {r.returncode}, {'; '.join(summary)}; JSON: {out}")
    if r.returncode:
        raise SystemExit(1)


def commit() -> str:
    """The checked-out commit, '+dirty' when tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="an exported model folder (default: models/onnx, else a fresh cpu-mini "
                    "exported to $TMPDIR/gptpkg-bench-model)")  # fmt: skip
    ap.add_argument("--checkpoint", help="the classifier to export when --model-dir has no model (default: fresh)")
    ap.add_argument("--variant", choices=["fp32", "int8"], default="fp32", help="the ONNX file all contenders serve")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="service setting (repeatable)")
    ap.add_argument("--servers", nargs="+", choices=[*SERVERS, "in-process"], default=[*SERVERS, "in-process"])
    ap.add_argument("--duration", type=int, default=20, help="seconds per load")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 s per load, 1 repeat")
    ap.add_argument("--contract", type=int, metavar="SECONDS", help="run schemathesis for SECONDS instead")
    ap.add_argument("--out", help="the JSON (default: bench/results/service.json; $TMPDIR/... with --quick)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found on PATH; the load comes from it (Debian/Ubuntu: apt-get install wrk)")
    extra_env = dict(e.split("=", 1) for e in args.env if "=" in e)
    if len(extra_env) != len(args.env):
        raise SystemExit(f"--env: expected KEY=VALUE, got {args.env}")
    if args.quick:
        args.duration, args.repeats = 3, 1
    default_out = BENCH / "results" / ("service_contract.json" if args.contract else "service.json")
    args.out = args.out or (Path(tempfile.gettempdir()) / "gptpkg-service-quick.json" if args.quick else default_out)
    if not (1 <= args.duration <= 600 and 1 <= args.repeats <= 20):
        raise SystemExit("--duration 1..600 s and --repeats 1..20: a bounded load")
    if args.contract is not None and not 1 <= args.contract <= 3600:
        raise SystemExit("--contract 1..3600 s: a bounded run")

    default = ROOT / "models" / "onnx"
    folder = Path(args.model_dir) if args.model_dir else default
    if not args.model_dir and not (default / FP32_FILE).is_file():
        folder = Path(tempfile.gettempdir()) / "gptpkg-bench-model"
    model_file = folder / (FP32_FILE if args.variant == "fp32" else INT8_FILE)
    if not model_file.is_file():
        build(folder, args.checkpoint)
    if not model_file.is_file():
        raise SystemExit(f"{model_file}: not found (the export's int8 gate may have dropped it)")
    if args.contract:
        return contract(model_file, extra_env, args.contract, Path(args.out))
    texts = sms_texts(1000)
    servers = [s for s in SERVERS if s in args.servers]
    runs: dict = {s: {f"{c}x{k}": [] for c, k in LOADS} for s in servers}
    limits: dict = {name: [] for name in LIMITS} if "in-process" in args.servers else {}
    load_avg = [round(os.getloadavg()[0], 2)]
    with tempfile.TemporaryDirectory(prefix="gptpkg-bench-service-") as tmp:
        tmp = Path(tmp)
        (tmp / "load.lua").write_text(LUA)
        rng = random.Random(0)
        bodies = {1: tmp / "single.jsonl", 16: tmp / "multi.jsonl"}
        bodies[1].write_text("".join(json.dumps({"texts": [t]}) + "\n" for t in texts))
        bodies[16].write_text("".join(json.dumps({"texts": rng.sample(texts, 16)}) + "\n" for _ in texts))
        for rep in range(args.repeats):
            order = servers if rep % 2 == 0 else servers[::-1]
            started: dict = {}
            try:
                for server in order:
                    started[server] = start_server(server, model_file, extra_env, tmp / f"{server}.log")
                    wrk(started[server][1], bodies[1], 8, 1 if args.quick else 3, tmp / "load.lua")  # warm-up
                for i, (c, k) in enumerate(LOADS):
                    for server in order if i % 2 == 0 else order[::-1]:
                        proc, url = started[server]
                        r = load_run(proc, url, bodies[k], c, k, args.duration, tmp / "load.lua")
                        runs[server][f"{c}x{k}"].append(r)
                        print(f"repeat {rep + 1} {server} {c}x{k}: {r}", flush=True)
                        if r["errors"]:
                            lines = (tmp / f"{server}.log").read_text().splitlines()[-20:]
                            print("  the server's last log lines:", *lines, sep="\n  ")
            finally:
                for proc, _ in started.values():
                    stop_group(proc)
            for name in limits:
                limits[name].append(in_process_limit(model_file, texts, LIMITS[name], args.duration))
                print(f"repeat {rep + 1} in-process {name}: {limits[name][-1]}", flush=True)
    load_avg.append(round(os.getloadavg()[0], 2))
    median = {s: {key: medians(rs) for key, rs in loads.items()} for s, loads in runs.items()}
    if limits:
        median["in-process"] = {name: medians(rs) for name, rs in limits.items()}
    cost = metrics_cost(runs) if {"service", "service-metrics-off"} <= runs.keys() else {}
    res = {
        "commit": commit(),
        "model_file": str(model_file),
        "service_env": extra_env,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_1m_start_end": load_avg,
        "wrk": "1 thread, closed loop, keep-alive, 10 s timeout",
        "servers": servers,
        "median": median,
        "metrics_cost": cost,
        "runs": {**runs, "in-process": limits},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    env = " ".join(f"{k}={v}" for k, v in extra_env.items()) or "shipped defaults"
    print(
        f"\n{res['commit']}, {model_file}; service: {env}; {args.duration} s per load, median of {args.repeats}; "
        f"load average {load_avg[0]} -> {load_avg[1]} on {os.cpu_count()} CPUs shared by servers and wrk; "
        f"JSON: {args.out}\n"
    )
    print(table(res))


if __name__ == "__main__":
    main()

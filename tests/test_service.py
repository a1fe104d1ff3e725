"""The spam service, started for real with `bentoml serve` on 127.0.0.1 and called over HTTP."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import httpx
import pytest
import yaml
from helpers import free_port, stop_group

import gptpkg
from gptpkg.onnx_classifier import FP32_FILE, OnnxSpamClassifier

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")
MAX_TEXTS, MAX_CHARS = 8, 300
pytestmark = pytest.mark.integration


def service_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTPKG_MODEL_")}
    env.update(
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="true",
        GPTPKG_MAX_TEXTS=str(MAX_TEXTS),
        GPTPKG_MAX_TEXT_CHARS=str(MAX_CHARS),
        GPTPKG_WORKERS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def start(env: dict[str, str], port: int) -> subprocess.Popen:
    # The log goes to a file: an unread pipe fills up and then blocks the server.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop)
    proc = subprocess.Popen(
        [BENTOML, "serve", "serving.service:SpamClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    proc.log = log
    return proc


def stop(proc: subprocess.Popen) -> str:
    stop_group(proc, timeout=20)
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    return out


@pytest.fixture(scope="module")
def packaged(tiny_onnx_export, tmp_path_factory):
    """The tiny export imported into a fresh BentoML store by `gptpkg package`."""

    params, _ = tiny_onnx_export
    tmp = tmp_path_factory.mktemp("bento")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    home = tmp / "home"
    r = subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", "package", "--params", str(tmp / "params.yaml")],
        env=service_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # the service serves the promoted version (package alone changes nothing it serves)
    r = subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", "promote", "--params", str(tmp / "params.yaml")],
        cwd=tmp,
        env={**service_env(home), "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "is now gptpkg-spam-classifier-served:latest" in r.stdout, r.stdout
    return home, Path(params.paths.onnx) / FP32_FILE


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    """`helpers.wait_ready` on /readyz; on failure, the server's output in the message."""
    try:
        helpers.wait_ready(proc, url + "/readyz")
    except RuntimeError as e:
        pytest.fail(f"{e}:\n{stop(proc)}")


@pytest.fixture(scope="module")
def served(packaged):
    """The shipped defaults, on one worker: (url, the server process)."""
    port = free_port()
    proc = start(service_env(packaged[0]), port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        yield url, proc
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def log_so_far(proc: subprocess.Popen) -> str:
    """The server's log up to now (pread: the file offset it shares with the server stays)."""
    fd = proc.log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def post(url: str, route: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = kw.pop("headers", {"Content-Type": "application/json"})
    return httpx.post(url + route, content=data, headers=headers, timeout=30, **kw)


TEXTS = [
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461",
    "Ok lar... Joking wif u oni...",
    "",
    "Ünïcödé ✓ 東京 🙂 <|endoftext|> \x00 \u202e",
    "a" * MAX_CHARS,
]


def test_classify_answers_in_order(server, packaged):
    r = post(server, "/classify", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()
    expected = OnnxSpamClassifier(packaged[1], device="cpu").predict(TEXTS)
    assert len(got) == len(TEXTS)
    for g, e in zip(got, expected):
        assert set(g) == {"label", "spam_probability"}
        assert g["label"] in ("spam", "ham") and 0.0 <= g["spam_probability"] <= 1.0
        assert g["label"] == e["label"] and abs(g["spam_probability"] - e["spam_probability"]) < 1e-6
        assert g["label"] == ("spam" if g["spam_probability"] > 0.5 else "ham")


def test_same_result_alone_batched_and_concurrent(server):
    batched = post(server, "/classify", {"texts": TEXTS}).json()
    alone = [post(server, "/classify", {"texts": [t]}).json()[0] for t in TEXTS]
    one = [post(server, "/classify_text", {"text": t}).json() for t in TEXTS]
    # Concurrent requests, which the adaptive batcher may merge into one model run.
    with ThreadPoolExecutor(8) as pool:
        conc = list(
            pool.map(
                lambda i: post(server, "/classify", {"texts": [TEXTS[i % 5], TEXTS[(i + 1) % 5]]}).json(), range(16)
            )
        )
    for i in range(len(TEXTS)):
        for other in (alone[i], one[i], conc[i][0], conc[(i - 1) % 5][1]):
            assert other["label"] == batched[i]["label"]
            assert abs(other["spam_probability"] - batched[i]["spam_probability"]) < 1e-6


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"texts": []}, 400, "at least 1"),
        ({"texts": ["ok", 3]}, 400, "valid string"),
        ({"texts": [None]}, 400, "valid string"),
        ({"texts": "just a string"}, 400, "valid array"),
        ({"texts": ["x"] * (MAX_TEXTS + 1)}, 400, f"at most {MAX_TEXTS}"),
        ({"texts": ["a" * (MAX_CHARS + 1)]}, 400, f"at most {MAX_CHARS} characters"),
        ({"text": "wrong key"}, 400, "Field required"),
        (["not", "an", "object"], 400, "object"),
        ('{"texts": ["unterminated', 400, "Invalid JSON"),
        ("", 400, "Field required"),
    ],
)
def test_bad_input_gets_4xx_with_a_message(server, body, status, words):
    r = post(server, "/classify", body)
    assert r.status_code == status, r.text
    assert words in r.text
    assert httpx.get(server + "/livez", timeout=5).status_code == 200


def test_client_errors_are_one_info_line_in_the_log(served):
    url, proc = served
    before = len(log_so_far(proc))
    bodies = [{"texts": []}, '{"texts": ["unterminated', {"text": 5}]
    for route, body in zip(["/classify", "/classify", "/classify_text"], bodies):
        assert post(url, route, body).status_code == 400
    assert post(url, "/classify", {"texts": ["hi"]}).status_code == 200  # after the three in the log
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and log_so_far(proc)[before:].count("client error 400") < 3:
        time.sleep(0.1)
    new = log_so_far(proc)[before:]
    lines = [line for line in new.splitlines() if "client error" in line]
    assert len(lines) == 3, new
    assert all("[INFO]" in line for line in lines), lines
    assert "/classify_text [POST]: text: Input should be a valid string" in lines[2]
    assert "Traceback" not in new and "[ERROR]" not in new, new


def test_a_server_error_stays_an_error_with_its_traceback():
    from serving.http_limits import ClientErrorsInOneLine

    def record(exc: Exception) -> logging.LogRecord:
        try:
            raise exc
        except Exception:
            info = sys.exc_info()
        return logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]", ("/x", "POST"), info)

    kept = record(RuntimeError("the model broke"))
    assert ClientErrorsInOneLine().filter(kept)
    assert kept.levelno == logging.ERROR and kept.exc_info[0] is RuntimeError
    from bentoml.exceptions import InternalServerError, InvalidArgument

    assert ClientErrorsInOneLine().filter(server := record(InternalServerError("boom")))
    assert server.levelno == logging.ERROR and server.exc_info is not None
    client = record(InvalidArgument("no such field"))
    assert ClientErrorsInOneLine().filter(client)
    assert client.levelno == logging.INFO and client.exc_info is None
    assert client.getMessage() == "client error 400 on /x [POST]: no such field"


def test_wrong_content_type_and_single_route_errors(server):
    r = post(server, "/classify", json.dumps({"texts": ["hi"]}), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = post(server, "/classify", b"texts=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = post(
        server,
        "/classify",
        b'{"texts":["hi"]}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200
    assert post(server, "/classify_text", {"text": 5}).status_code == 400
    assert post(server, "/classify_text", {"text": ""}).status_code == 200


def test_health_metrics_and_openapi(server):
    assert httpx.get(server + "/livez", timeout=5).status_code == 200
    assert httpx.get(server + "/readyz", timeout=5).status_code == 200
    assert post(server, "/classify", {"texts": ["hello"]}).status_code == 200
    spec = httpx.get(server + "/docs.json", timeout=5).json()
    assert spec["info"]["version"] == gptpkg.__version__  # served from source: the package's
    for route in ("/classify", "/classify_text"):
        responses = spec["paths"][route]["post"]["responses"]
        assert {"200", "400", "413", "415"} <= set(responses), responses
        assert responses["413"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/RequestError"
        }
    assert spec["components"]["schemas"]["RequestError"]["required"] == ["error"]
    # /metrics is served (metrics are on by default) and documented as what it serves
    metrics = httpx.get(server + "/metrics", timeout=5)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client's parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def by_route(samples: dict, name: str, *keys: str, **where: str) -> dict[tuple, float]:
    """Samples called `name` on the classify routes, keyed by their `keys` labels and summed
    over the others; only those whose labels include `where`."""
    out: dict[tuple, float] = {}
    for (n, labels), value in samples.items():
        labels = dict(labels)
        if n == name and labels.get("route") in ("/classify", "/classify_text") and where.items() <= labels.items():
            key = tuple(labels[k] for k in keys)
            out[key] = out.get(key, 0.0) + value
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_metrics_count_each_answer_by_route_and_status(server):
    """Requests of each kind over HTTP, then /metrics: the latency histogram moved by
    exactly those requests, per route and status; paths the service has not are counted
    under route "other", whatever they are."""
    before = scrape(server)
    big = json.dumps({"texts": ["a" * (2 * MAX_CHARS * MAX_TEXTS * 12)]})
    answers = [
        post(server, "/classify", {"texts": ["hello", "WIN a prize"]}),
        post(server, "/classify", {"texts": ["hi"]}),
        post(server, "/classify", {"texts": ["x"] * MAX_TEXTS}),
        post(server, "/classify", {"texts": []}),
        post(server, "/classify", '{"texts": ["unterminated'),
        post(server, "/classify", big),
        post(server, "/classify", b'{"texts": ["hi"]}', headers={"Content-Type": "text/plain"}),
        post(server, "/classify_text", {"text": "see you at lunch"}),
        post(server, "/classify_text", {"text": ""}),
        post(server, "/classify_text", {"text": 5}),
    ]
    assert [r.status_code for r in answers] == [200, 200, 200, 400, 400, 413, 415, 200, 200, 400]
    strays = [httpx.get(f"{server}/stray-{os.urandom(4).hex()}", timeout=5) for _ in range(3)]
    assert [r.status_code for r in strays] == [404] * 3
    after = scrape(server)
    expected = {
        ("/classify", "200"): 3,
        ("/classify", "400"): 2,
        ("/classify", "413"): 1,
        ("/classify", "415"): 1,
        ("/classify_text", "200"): 2,
        ("/classify_text", "400"): 1,
    }
    keys = ("route", "status")
    count = "gptpkg_http_request_duration_seconds_count"
    assert delta(by_route(after, count, *keys), by_route(before, count, *keys)) == expected
    inf = "gptpkg_http_request_duration_seconds_bucket"
    assert delta(by_route(after, inf, *keys, le="+Inf"), by_route(before, inf, *keys, le="+Inf")) == expected
    sums = delta(*(by_route(s, "gptpkg_http_request_duration_seconds_sum", *keys) for s in (after, before)))
    assert set(sums) == set(expected) and all(0 < v < 30 for v in sums.values()), sums
    # the buckets resolve sub-millisecond answers (Prometheus' defaults start at 5 ms)
    bounds = {dict(labels)["le"] for (n, labels) in after if n == inf}
    assert {"0.0005", "0.001", "0.0025", "30.0", "+Inf"} <= bounds, bounds
    # the stray paths: one series, "other", never the path itself
    routes = {dict(labels).get("route") for (n, labels) in after if n == count}
    assert routes <= {"/classify", "/classify_text", "/livez", "/readyz", "/healthz", "/", "/docs.json", "other"}
    other = [sum(v for (n, k), v in s.items() if n == count and dict(k)["route"] == "other") for s in (after, before)]
    assert other[0] - other[1] == 3, other
    # the served model: its store tag resolved to the version `gptpkg package` wrote
    [(labels, value)] = [(dict(labels), v) for (n, labels), v in after.items() if n == "gptpkg_model_info"]
    assert value == 1.0
    assert labels["model_tag"].startswith("gptpkg-spam-classifier-served:fp32-") and labels["variant"] == "fp32", labels
    assert labels["device"] == "cpu"


def test_metrics_show_a_request_in_flight(server):
    """A /classify request whose chunked body is still coming is in flight: the gauge says
    1 for its route while it is, 0 once it is answered."""
    gauge = "gptpkg_http_requests_in_flight"
    assert by_route(scrape(server), gauge, "route").get(("/classify",), 0.0) == 0.0
    host, port = server.removeprefix("http://").split(":")
    head = b'{"texts": ["hi"'
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(head), head)
        )
        deadline = time.monotonic() + 10
        while by_route(scrape(server), gauge, "route").get(("/classify",), 0.0) != 1.0:
            assert time.monotonic() < deadline, "the request in flight never showed"
            time.sleep(0.1)
        s.sendall(b"2\r\n]}\r\n0\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    assert by_route(scrape(server), gauge, "route")[("/classify",)] == 0.0


def test_metrics_off_leaves_metrics_unserved_and_undocumented(packaged):
    port = free_port()
    proc = start(service_env(packaged[0], GPTPKG_METRICS="off"), port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        assert post(url, "/classify", {"texts": ["hi"]}).status_code == 200
        assert httpx.get(url + "/metrics", timeout=5).status_code == 404
        spec = httpx.get(url + "/docs.json", timeout=5).json()
        assert "/metrics" not in spec["paths"] and {"/classify", "/livez", "/readyz"} <= set(spec["paths"])
    finally:
        stop(proc)


def _refused(env: dict[str, str]) -> str:
    proc = start(env, free_port())
    try:
        proc.wait(timeout=120)
    finally:
        out = stop(proc)
    assert proc.returncode not in (0, None)
    return out


def test_refuses_to_start_without_a_model(tmp_path):
    out = _refused(service_env(tmp_path / "empty-home"))
    assert "not in the BentoML model store" in out and "gptpkg package" in out
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    out = _refused(service_env(tmp_path / "empty-home", GPTPKG_MODEL_PATH=str(bad)))
    assert "unreadable" in out
    out = _refused(service_env(tmp_path / "empty-home", GPTPKG_MODEL_PATH=str(tmp_path / "nowhere")))
    assert "no ONNX model at" in out


def test_settings_name_the_variable_and_the_expected_value(monkeypatch):
    from serving.settings import SettingsError, load_settings

    for key in [k for k in os.environ if k.startswith("GPTPKG_") and k != "GPTPKG_DATA_MIRROR"]:
        monkeypatch.delenv(key)
    shipped = load_settings()
    assert (shipped.workers, shipped.ort_threads, shipped.batching) == ("cpu_count", 1, False)
    assert (shipped.metrics, shipped.tracing) == (True, False)
    monkeypatch.setenv("GPTPKG_BATCHING", "on")
    monkeypatch.setenv("GPTPKG_WORKERS", "3")
    assert (load_settings().batching, load_settings().workers) == (True, 3)
    for key, value, message in [
        ("GPTPKG_BATCHING", "sometimes", "GPTPKG_BATCHING='sometimes': expected on|off"),
        ("GPTPKG_MAX_TEXTS", "0", "GPTPKG_MAX_TEXTS='0': expected an integer >= 1"),
        ("GPTPKG_WORKERS", "many", "GPTPKG_WORKERS='many': expected an integer >= 1 or cpu_count"),
        ("GPTPKG_DEVICE", "tpu", "GPTPKG_DEVICE='tpu': expected auto|cpu|cuda"),
        ("GPTPKG_ORT_THREADS", "-1", "GPTPKG_ORT_THREADS='-1': expected an integer >= 0"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(key, value)
            with pytest.raises(SettingsError) as e:
                load_settings()
            assert str(e.value) == message


def test_refuses_bad_settings(packaged):
    out = _refused(service_env(packaged[0], GPTPKG_MAX_TEXTS="0"))
    # one line naming the variable, no traceback (GPTPKG_DEBUG=1 shows it)
    assert "spam_classifier: error: GPTPKG_MAX_TEXTS='0': expected an integer >= 1" in out
    assert "Traceback" not in out, out
    assert "Traceback" in _refused(service_env(packaged[0], GPTPKG_MAX_TEXTS="0", GPTPKG_DEBUG="1"))


def test_provider_choice():
    from gptpkg.onnx_classifier import CPU, CUDA, ModelUnavailable, choose_providers

    gpu_build = [CUDA, CPU]
    assert choose_providers("auto", gpu_build) == [CUDA, CPU]
    assert choose_providers("cuda", gpu_build) == [CUDA, CPU]
    assert choose_providers("cpu", gpu_build) == [CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    with pytest.raises(ModelUnavailable, match="install onnxruntime-gpu"):
        choose_providers("cuda", [CPU])
    assert choose_providers("auto")[-1] == CPU  # this machine's onnxruntime


def test_length_chunks_sort_and_bound_padding():
    from gptpkg.onnx_classifier import length_chunks

    lengths = [30, 2, 31, 3, 120, 2, 29, 118]
    chunks = length_chunks(lengths, max_rows=64)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert chunks == [[1, 5], [3], [6, 0, 2], [7, 4]]
    for c in chunks:
        assert len(c) * max(lengths[i] for i in c) <= 1.25 * sum(lengths[i] for i in c)
    assert [len(c) for c in length_chunks([5] * 10, max_rows=4)] == [4, 4, 2]


def test_serving_path_never_imports_torch(packaged):
    code = (
        "import asyncio, sys; import serving.service as s; c = s.SpamClassifier.inner(); "
        "print(asyncio.run(c.classify(['win a prize', '']))); print(asyncio.run(c.classify_text('hi'))); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=service_env(packaged[0]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spam_probability" in r.stdout


def build(home: Path, bentofile: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BENTOML, "build", "-f", f"serving/{bentofile}", "-o", "tag", "."],
        cwd=ROOT,
        env=service_env(home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bentoml_build_refuses_a_model_path(packaged):
    r = build(packaged[0], "bentofile.yaml", GPTPKG_MODEL_PATH=str(packaged[1]))
    assert r.returncode != 0
    assert f"GPTPKG_MODEL_PATH={str(packaged[1])!r}: a Bento serves the model it packs" in r.stdout + r.stderr


@pytest.mark.parametrize(
    "bentofile, runtime", [("bentofile.yaml", "onnxruntime"), ("bentofile-gpu.yaml", "onnxruntime-gpu")]
)
def test_bentoml_build_makes_a_lean_bento(packaged, bentofile, runtime):
    home, _ = packaged
    r = build(home, bentofile)
    assert r.returncode == 0, r.stdout + r.stderr
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = home / "bentos" / name / version
    files = {str(p.relative_to(bento / "src")) for p in (bento / "src").rglob("*") if p.is_file()}
    assert "serving/service.py" in files and "gptpkg/onnx_classifier.py" in files
    assert not [
        f
        for f in files
        if f.startswith(("tests/", "data/", "models/", "bench/")) or "__pycache__" in f or f.endswith((".pyc", ".onnx"))
    ], files
    assert "gptpkg/model.py" not in files  # the torch side stays out
    # Every module the bento's code imports is in the bento (gptpkg's) or among its python
    # packages (third-party): a bento missing one fails only when it is served elsewhere.
    config = yaml.safe_load((ROOT / "serving" / bentofile).read_text())
    packages = {re.split(r"[<>=!~\[ ]", p)[0].lower() for p in config["python"]["packages"]}
    assert runtime in packages and {"onnxruntime", "onnxruntime-gpu"} - {runtime} - packages
    distribution = {
        "yaml": "pyyaml",
        "pydantic_settings": "pydantic-settings",
        "prometheus_client": "prometheus-client",
    }  # import name -> package name
    off_serving_path = {"tqdm"}  # fetch's download progress bar; the service reads the bundled BPE files
    missing = []
    for f in sorted(x for x in files if x.endswith(".py")):
        for node in ast.walk(ast.parse((bento / "src" / f).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # from .x import y (inside gptpkg/ or serving/)
                mod = f"{Path(f).parent}/{node.module.replace('.', '/')}.py"
                if mod not in files:
                    missing.append(f"{f}: {mod}")
                continue
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top in ("gptpkg", "serving"):
                    if (
                        f"{name.replace('.', '/')}.py" not in files
                        and f"{name.replace('.', '/')}/__init__.py" not in files
                    ):
                        missing.append(f"{f}: {name}")
                elif (
                    top not in sys.stdlib_module_names
                    and top != "__future__"
                    and top not in off_serving_path
                    and distribution.get(top, top) not in packages
                    and not (top == "onnxruntime" and runtime in packages)
                ):
                    missing.append(f"{f}: third-party {top}")
    assert not missing, missing
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    # the store model is declared (`bentoml export` / `containerize` take it from the store)
    [service] = info["services"]
    assert [m["tag"].split(":")[0] for m in service["models"]] == [
        "gptpkg-spam-classifier-served"
    ]  # the promoted model
    assert info["args"] == {"bento": True}
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert any(re.match(rf"{runtime}[<>=]", line) for line in requirements), requirements
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert ("nvidia/cuda:12.8" in dockerfile) == (runtime == "onnxruntime-gpu"), dockerfile[:400]


def test_longest_valid_body_passes_and_longer_bodies_get_413(server):
    from serving.http_limits import max_body_bytes

    emoji = {"texts": ["🙂" * MAX_CHARS] * MAX_TEXTS}  # JSON-escaped: 12 bytes per character
    r = post(server, "/classify", json.dumps(emoji))
    assert r.status_code == 200, r.text
    assert post(server, "/classify_text", json.dumps({"text": "🙂" * MAX_CHARS})).status_code == 200
    bound = max_body_bytes(MAX_TEXTS, MAX_CHARS)
    too_long = json.dumps({"texts": ["a" * (bound + 1)]})
    r = post(server, "/classify", too_long)
    assert r.status_code == 413 and f"exceeds {bound}" in r.json()["error"]


def test_chunked_body_is_bounded_while_it_streams(server):
    """A chunked body without Content-Length: the answer is 413 once the bound is passed,
    while the client is still sending (the server holds at most the bound)."""
    import select

    from serving.http_limits import max_body_bytes

    host, port = server.removeprefix("http://").split(":")
    chunk = b"[" + b" " * 8190 + b"]"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        while not select.select([s], [], [], 0.01)[0]:
            assert sent < 100 * max_body_bytes(MAX_TEXTS, MAX_CHARS), "no answer while the body kept coming"
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        answer = s.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer
    assert sent < 4 * max_body_bytes(MAX_TEXTS, MAX_CHARS)
    assert httpx.get(server + "/livez", timeout=5).status_code == 200


def test_schemathesis_finds_no_contract_failure(server, tmp_path):
    """A bounded, seeded schemathesis run of every check on every documented route (the
    classify routes, health and /metrics) against /docs.json, offline: 127.0.0.1 only.
    The longer run: `python bench/bench_service.py --contract 150`."""
    st = str(Path(sys.executable).parent / "schemathesis")
    r = subprocess.run(
        [
            st,
            "run",
            f"{server}/docs.json",
            "--url",
            server,
            "--checks",
            "all",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--max-time",
            "20",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_a_killed_worker_is_replaced_and_takes_traffic(packaged):
    """Two workers under load from 8 clients; one is killed with SIGKILL. Only requests
    in flight may fail, a replacement starts within 10 s and by 13 s serves its share again
    (on 2 busy cores its start-up, imports and warm-up run, can take most of the first 10 s).
    Adaptive batching is on here (off by default), metrics are on (the default), and count
    the answers of both workers."""
    import threading

    import psutil

    port = free_port()
    env = service_env(packaged[0], GPTPKG_WORKERS="2", GPTPKG_BATCHING="on")
    proc = start(env, port)
    url = f"http://127.0.0.1:{port}"
    clients, done, events = 8, threading.Event(), []

    def workers() -> dict[int, psutil.Process]:
        found = {}
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "_bentoml_impl.worker" in " ".join(p.cmdline()):
                    found[p.pid] = p
            except psutil.Error:  # the killed one, until it is reaped
                pass
        return found

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            while not done.is_set():
                try:
                    ok = c.post(url + "/classify", json={"texts": [TEXTS[len(events) % 5]]}).status_code == 200
                except httpx.TransportError:
                    ok = False
                events.append((time.monotonic(), ok))

    def rate(since: float, until: float) -> float:
        return sum(ok for t, ok in events if since <= t < until) / (until - since)

    try:
        wait_ready(proc, url)
        before = workers()
        assert len(before) == 2, before
        threads = [threading.Thread(target=load) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(4)
        victim, survivor = list(before.values())
        killed = time.monotonic()
        victim.kill()
        deadline = killed + 10
        while time.monotonic() < deadline and len(set(workers()) - set(before)) == 0:
            time.sleep(0.2)
        [new] = [p for pid, p in workers().items() if pid not in before]
        time.sleep(max(0.0, killed + 10 - time.monotonic()))
        cpu = {p.pid: sum(p.cpu_times()[:2]) for p in (new, survivor)}
        time.sleep(3)
        share = (sum(new.cpu_times()[:2]) - cpu[new.pid]) / (sum(survivor.cpu_times()[:2]) - cpu[survivor.pid])
        done.set()
        for t in threads:
            t.join()
        failed = [t - killed for t, ok in events if not ok]
        assert len(failed) <= clients, failed
        assert share > 0.3, f"the replacement worker did {share:.0%} of the survivor's work"
        assert rate(killed + 10, killed + 13) >= 0.7 * rate(killed - 3, killed), (
            rate(killed + 10, killed + 13),
            rate(killed - 3, killed),
        )
        # Whichever worker answers /metrics, it counts the answers of all workers, the
        # killed one's included; a request may count as answered and still fail at the
        # client when its worker died sending it.
        # An answer is counted once its last byte is sent: the client may read it a moment
        # before, so the scrape waits (up to 2 s) for the counts to catch up.
        ok, until = sum(ok for _, ok in events), time.monotonic() + 2
        while True:
            samples = scrape(url)
            served = by_route(samples, "gptpkg_http_request_duration_seconds_count", "status")[("200",)]
            if served >= ok or time.monotonic() > until:
                break
            time.sleep(0.1)
        assert ok <= served <= ok + len(failed), (ok, served, failed)
        assert samples[("gptpkg_batch_texts_count", ())] > 0
    finally:
        done.set()
        stop(proc)

"""The spam service, started for real with `bentoml serve` on 127.0.0.1 and called over HTTP."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import stop_group

from gptpkg.onnx_classifier import FP32_FILE, OnnxSpamClassifier

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")
MAX_TEXTS, MAX_CHARS = 8, 300
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTPKG_MODEL_")}
    env.update(
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="true",
        GPTPKG_MAX_TEXTS=str(MAX_TEXTS),
        GPTPKG_MAX_TEXT_CHARS=str(MAX_CHARS),
        GPTPKG_ORT_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def start(env: dict[str, str], port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [BENTOML, "serve", "serving.service:SpamClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> str:
    stop_group(proc, timeout=20)
    return proc.stdout.read() if proc.stdout else ""


@pytest.fixture(scope="module")
def packaged(tiny_onnx_export, tmp_path_factory):
    """The tiny export imported into a fresh BentoML store by `gptpkg package`."""
    import dataclasses

    params, _ = tiny_onnx_export
    tmp = tmp_path_factory.mktemp("bento")
    (tmp / "params.yaml").write_text(yaml.safe_dump(dataclasses.asdict(params), sort_keys=False))
    home = tmp / "home"
    r = subprocess.run(
        [sys.executable, "-m", "gptpkg.cli", "package", "--params", str(tmp / "params.yaml")],
        env=service_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return home, Path(params.paths.onnx) / FP32_FILE


@pytest.fixture(scope="module")
def server(packaged):
    home, _ = packaged
    port = free_port()
    proc = start(service_env(home), port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"bentoml serve exited:\n{stop(proc)}"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"not ready in 120 s:\n{stop(proc)}"
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


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
    metrics = httpx.get(server + "/metrics", timeout=5)
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    # /classify went through the adaptive batcher (on by default)
    assert 'bentoml_service_adaptive_batch_size_count{method_name="classify"' in metrics.text
    spec = httpx.get(server + "/docs.json", timeout=5).json()
    assert "/classify" in spec["paths"] and "/classify_text" in spec["paths"]


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


def test_refuses_bad_settings(packaged):
    out = _refused(service_env(packaged[0], GPTPKG_BATCHING="sometimes"))
    assert "GPTPKG_BATCHING='sometimes': expected on|off" in out
    out = _refused(service_env(packaged[0], GPTPKG_MAX_TEXTS="0"))
    assert "GPTPKG_MAX_TEXTS=0: expected an integer >= 1" in out


def test_serving_path_never_imports_torch(packaged):
    code = (
        "import sys; import serving.service as s; c = s.SpamClassifier.inner(); "
        "print(c.classify(['win a prize', ''])); print(c.classify_text('hi')); "
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


def test_bentoml_build_makes_a_lean_bento(packaged, tmp_path):
    home, _ = packaged
    r = subprocess.run(
        [BENTOML, "build", "-f", "serving/bentofile.yaml", "-o", "tag", "."],
        cwd=ROOT,
        env=service_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    bentofile = yaml.safe_load((ROOT / "serving" / "bentofile.yaml").read_text())
    packages = {re.split(r"[<>=!~\[ ]", p)[0].lower() for p in bentofile["python"]["packages"]}
    distribution = {"yaml": "pyyaml"}  # import name -> package name, where they differ
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
                ):
                    missing.append(f"{f}: third-party {top}")
    assert not missing, missing
    assert "gptpkg-spam-classifier" in (bento / "bento.yaml").read_text()  # the model is referenced

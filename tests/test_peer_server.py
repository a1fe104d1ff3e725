"""bench/peer_server.py, the peer the service is benchmarked against, holds the service's
/classify contract (checked in-process with Starlette's TestClient)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gptpkg.onnx_classifier import FP32_FILE, OnnxSpamClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peer_server import MAX_TEXTS, create_app  # noqa: E402


@pytest.fixture(scope="module")
def peer(tiny_onnx_export):
    params, _ = tiny_onnx_export
    model = Path(params.paths.onnx) / FP32_FILE
    with TestClient(create_app(str(model))) as client:
        yield client, OnnxSpamClassifier(model, device="cpu", threads=1)


def test_answers_like_the_classifier_in_order(peer):
    client, clf = peer
    texts = ["WINNER!! Claim your free prize now", "", "see you at 5?", "¡Olé! 🎉 <|endoftext|> 東京"]
    r = client.post("/classify", json={"texts": texts})
    assert r.status_code == 200
    assert r.json() == clf.predict(texts)
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"null", b'{"text": "a"}', b'{"texts": []}', b'{"texts": [1]}', b'{"texts": "a"}'],
)
def test_bad_bodies_get_400_with_a_message(peer, body):
    client, _ = peer
    r = client.post("/classify", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "expected" in r.json()["error"]


def test_too_many_texts_get_400(peer):
    client, _ = peer
    r = client.post("/classify", content=json.dumps({"texts": ["hi"] * (MAX_TEXTS + 1)}))
    assert r.status_code == 400 and f"1..{MAX_TEXTS}" in r.json()["error"]

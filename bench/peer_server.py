"""The peer that `bench_service.py` measures the BentoML service against: the same
`OnnxSpamClassifier` in a minimal Starlette app under uvicorn. Not part of the product.

Same contract as the service's POST /classify: {"texts": [str, ...]} (1..64 texts) ->
[{"label", "spam_probability"}, ...] in order; 400 with {"error"} for anything else.
ONNX Runtime runs with 1 intra-op thread, inline in the async handler (no thread-pool
hop); one process per worker. GET /readyz answers 200 once the model is loaded.

    GPTPKG_MODEL_PATH=/tmp/bench-model/model.onnx python bench/peer_server.py --port 3001
"""

from __future__ import annotations

import argparse
import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gptpkg.onnx_classifier import OnnxSpamClassifier

MAX_TEXTS = 64


def create_app(model_path: str | None = None) -> Starlette:
    """The app serving `model_path` (default: $GPTPKG_MODEL_PATH, an ONNX file)."""
    clf = OnnxSpamClassifier(model_path or os.environ["GPTPKG_MODEL_PATH"], device="cpu", threads=1)

    async def classify(request: Request) -> JSONResponse:
        try:
            texts = json.loads(await request.body())["texts"]
        except (ValueError, TypeError, KeyError):
            return JSONResponse({"error": 'expected a JSON object {"texts": [...]}'}, status_code=400)
        if not (isinstance(texts, list) and 1 <= len(texts) <= MAX_TEXTS and all(isinstance(t, str) for t in texts)):
            return JSONResponse({"error": f"texts: expected a list of 1..{MAX_TEXTS} strings"}, status_code=400)
        return JSONResponse(clf.predict(texts))

    async def ready(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", ready)])


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3001)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    uvicorn.run(
        "peer_server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()

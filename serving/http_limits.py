"""ASGI middleware in front of the BentoML app: the request-body bound and the media type
of the classify routes, and the error responses they add to the OpenAPI spec, which it
also makes say what /metrics is (or drop it when metrics are off) and which version it is;
the log filter that keeps a client's error out of the server's errors."""

from __future__ import annotations

import json
import logging
import random

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from gptpkg import __version__

# JSON-escaped, one character takes at most 12 bytes: an astral character written as a
# surrogate pair, "\ud83d\ude00" (a BMP one takes at most 6, raw UTF-8 at most 4).
BYTES_PER_CHAR = 12
# Per text: its quotes, a comma and some whitespace; per body: the envelope and whitespace.
TEXT_OVERHEAD, BODY_OVERHEAD = 16, 1024
# One answer in this many closes its keep-alive connection: the client reconnects, and
# the worker with the least to do accepts. Without it a client's connections stay where
# they landed, so a worker started later (a replacement after a crash) gets no traffic.
ROTATE_EVERY = 100

ERROR_SCHEMA = {
    "type": "object",
    "title": "RequestError",
    "properties": {
        "error": {"type": "string", "title": "Message"},
        "detail": {"title": "Error Detail", "description": "validation errors, when the body failed the schema"},
    },
    "required": ["error"],
}
ERRORS = {
    "400": "invalid JSON, or a body that fails the request schema",
    "413": "request body longer than the largest valid request",
    "415": "Content-Type is not application/json",
}


def max_body_bytes(max_texts: int, max_text_chars: int) -> int:
    """The longest body a schema-valid request can have (whitespace aside)."""
    return max_texts * (max_text_chars * BYTES_PER_CHAR + TEXT_OVERHEAD) + BODY_OVERHEAD


class RequestLimits:
    """POSTs to `routes` must be application/json (else 415) and at most `max_bytes` long
    (else 413). The body is counted while it streams in, chunked or not: reading stops
    and 413 is answered as soon as the bound is passed, so no body larger than the bound
    is ever held. One answer in ROTATE_EVERY says `Connection: close`. GET /docs.json
    gets these answers added to every route in `routes`, and /metrics as it is served
    (`metrics`: serving/metrics.py serves it) or not at all."""

    def __init__(self, app, routes: tuple[str, ...], max_bytes: int, metrics: bool) -> None:
        self.app, self.routes, self.max_bytes, self.metrics = app, routes, max_bytes, metrics
        self._spec: bytes | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in self.routes or scope["method"] != "POST":
            if scope["type"] == "http" and scope["path"] == "/docs.json" and scope["method"] == "GET":
                return await self._spec_with_errors(scope, receive, send)
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        if ctype != "application/json":
            return await _reject(send, 415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _reject(send, 413, f"request body of {int(length)} bytes exceeds {self.max_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _reject(send, 413, f"request body exceeds {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if random.randrange(ROTATE_EVERY):
            return await self.app(scope, replay, send)

        async def closing(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, replay, closing)

    async def _spec_with_errors(self, scope, receive, send) -> None:
        if self._spec is None:
            start, parts = {}, []

            async def keep(message):
                if message["type"] == "http.response.start":
                    start.update(message)
                else:
                    parts.append(message.get("body", b""))

            await self.app(scope, receive, keep)
            if start.get("status") != 200:
                return await _reject(send, 500, "Failed to generate OpenAPI spec")
            spec = with_version(with_metrics(with_errors(json.loads(b"".join(parts)), self.routes), self.metrics))
            self._spec = json.dumps(spec).encode()
        await _send(send, 200, self._spec)


def with_errors(spec: dict, routes: tuple[str, ...]) -> dict:
    """`spec` with the 400/413/415 answers of `routes` stated, all as RequestError, and
    their JSON body required (without one the answer is 415)."""
    spec.setdefault("components", {}).setdefault("schemas", {})["RequestError"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/RequestError"}
    for route in routes:
        spec["paths"][route]["post"]["requestBody"]["required"] = True
        responses = spec["paths"][route]["post"]["responses"]
        for status, description in ERRORS.items():
            responses[status] = {"description": description, "content": {"application/json": {"schema": ref}}}
    return spec


def with_metrics(spec: dict, served: bool) -> dict:
    """`spec` with GET /metrics documented as the Prometheus text the service serves when
    `served`, else without /metrics (BentoML lists it either way, and then answers 404)."""
    if not served:
        spec["paths"].pop("/metrics", None)
        return spec
    ok = spec["paths"]["/metrics"]["get"]["responses"]["200"]
    ok["description"] = "Prometheus text exposition format: the service's counters, histograms and gauges"
    ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return spec


def with_version(spec: dict) -> dict:
    """`spec` with a version: BentoML states the Bento's, and "None" serving from source,
    where the service's version is gptpkg's."""
    info = spec.setdefault("info", {})
    if info.get("version") in (None, "", "None"):
        info["version"] = __version__
    return spec


class ClientErrorsInOneLine(logging.Filter):
    """BentoML logs every exception a request raises as an ERROR with its traceback, a
    client's invalid body (its 400 answer) as much as a fault of the service. A client
    error (a pydantic ValidationError of the body, a BentoML error below 500) becomes one
    INFO line naming the route, the status and what was wrong; any other exception stays
    an ERROR with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            status = 400
            what = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        elif isinstance(exc, BentoMLException) and exc.error_code < 500:
            status, what = int(exc.error_code), str(exc)
        else:
            return True
        path, method = (record.args or ("?", "?"))[:2] if isinstance(record.args, tuple) else ("?", "?")
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "client error %d on %s [%s]: %s", (status, path, method, what)
        record.exc_info = record.exc_text = None
        return True


async def _reject(send, status: int, message: str) -> None:
    await _send(send, status, json.dumps({"error": message}).encode())


async def _send(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The service's Prometheus metrics: an ASGI middleware that times each request and
serves GET /metrics, in place of BentoML's metrics middleware (turned off in
serving/service.py).

Series (prometheus_client, multiprocess mode):
- gptpkg_http_request_duration_seconds{route,status}: a histogram of the time from a
  request's arrival to its answer; its `_count` is the number of answers per route and
  status.
- gptpkg_http_requests_in_flight{route}: requests received and not yet answered.
- gptpkg_model_info{model_tag,variant,device}: 1, the model this service serves.
- gptpkg_batch_texts: texts per model call, with adaptive batching on (GPTPKG_BATCHING).

`route` is the route's path for the routes the service has, "other" for any other path,
so a client sending random paths cannot grow the number of series. Why not BentoML's own:
per request it looks each series up by its labels (the raw path among them) and writes
six values to its multiprocess files; this writes four, to series looked up once per
(route, status) and kept (docs/performance.md has both measured).

Workers: `bentoml serve` gives every worker PROMETHEUS_MULTIPROC_DIR (a folder it empties
at start), so each worker's prometheus_client keeps its values in files there, and
/metrics, whichever worker answers it, adds up the files of all workers, the ones that
died included (their counts stay in the totals)."""

from __future__ import annotations

import asyncio
import atexit
import os
import time

OTHER = "other"


def model_info_gauge():
    """gptpkg_model_info, its labels set by export_model_info."""
    import prometheus_client

    return prometheus_client.Gauge(
        "gptpkg_model_info",
        "The model this service serves (value 1)",
        ["model_tag", "variant", "device"],
        multiprocess_mode="max",  # one series for all workers (all say 1)
    )


def export_model_info(labels: dict[str, str]) -> None:
    """Set gptpkg_model_info{labels} to 1 in this worker's share of the metrics."""
    model_info_gauge().labels(**labels).set(1)


def batch_texts_histogram(max_batch_size: int):
    """gptpkg_batch_texts: texts per model call while adaptive batching merges requests."""
    import prometheus_client

    buckets = [2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size] + [max_batch_size]
    return prometheus_client.Histogram(
        "gptpkg_batch_texts", "Texts per model call when adaptive batching merges requests", buckets=buckets
    )


def exposition() -> tuple[bytes, str]:
    """(body, content type) of /metrics: the values of every worker, added up."""
    import prometheus_client
    from prometheus_client import multiprocess

    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    metrics = list(registry.collect())
    for metric in metrics:
        if metric.type == "histogram":
            # The collector puts a series' _sum before its buckets; the exposition format
            # has its buckets (in ascending `le`), then _count, then _sum.
            metric.samples.sort(key=_histogram_order)
    return prometheus_client.generate_latest(_Collected(metrics)), prometheus_client.CONTENT_TYPE_LATEST


def _histogram_order(sample) -> tuple:
    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
    if sample.name.endswith("_bucket"):
        return labels, 0, float(sample.labels["le"])
    return labels, 1 if sample.name.endswith("_count") else 2, 0.0


class _Collected:
    """Metric families already collected, as the registry generate_latest reads."""

    def __init__(self, metrics: list) -> None:
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)


class RequestMetrics:
    """Times each HTTP request to `routes` (else counts it under route "other") and serves
    GET /metrics. A request is observed once its app returns, with the status it answered;
    one cancelled before answering (the 30 s traffic timeout outside this middleware cuts
    it off and answers 504) as 504, one whose app raised before answering as 500."""

    def __init__(self, app, routes: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.app, self.routes, self.buckets = app, frozenset(routes), buckets
        self._duration = None

    def _setup(self) -> None:
        # In the worker, on its first request: prometheus_client must be imported once
        # PROMETHEUS_MULTIPROC_DIR is set, else it keeps its values in-process, where the
        # other workers' /metrics never see them.
        import prometheus_client
        from prometheus_client import multiprocess

        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set: serve with `bentoml serve`")
        self._duration = prometheus_client.Histogram(
            "gptpkg_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route and status",
            ["route", "status"],
            buckets=self.buckets,
        )
        in_flight = prometheus_client.Gauge(
            "gptpkg_http_requests_in_flight",
            "Requests received and not yet answered, by route",
            ["route"],
            multiprocess_mode="livesum",
        )
        # Bound once: a request only does a dict look-up. (route, status) children come as
        # statuses appear; statuses are the app's own, so they stay few.
        self._in_flight = {r: in_flight.labels(r) for r in (*self.routes, OTHER)}
        self._observe: dict[tuple[str, int], object] = {}
        # A worker that exits cleanly takes its requests in flight out of the sum.
        atexit.register(multiprocess.mark_process_dead, os.getpid())

    def _observer(self, route: str, status: int):
        observe = self._duration.labels(route, str(status)).observe
        self._observe[(route, status)] = observe
        return observe

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._duration is None:
            self._setup()
        path = scope["path"]
        if path == "/metrics":
            return await self._serve(scope["method"], send)
        route = path if path in self.routes else OTHER
        status = 0

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = self._in_flight[route]
        gauge.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            status = status or 504
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            gauge.dec()
            # No answer at all: the client went away first (nginx's "client closed request").
            status = status or 499
            (self._observe.get((route, status)) or self._observer(route, status))(time.perf_counter() - start)

    async def _serve(self, method: str, send) -> None:
        if method not in ("GET", "HEAD"):
            headers = [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            return await send({"type": "http.response.body", "body": b""})
        # Reading and adding up the workers' files takes milliseconds: off the event loop.
        body, ctype = await asyncio.to_thread(exposition)
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body if method == "GET" else b""})

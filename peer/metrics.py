"""Prometheus metrics of one peer (`dmoe peer --metrics-port P`), in a registry of the peer's own.

What a scrape shows (every name starts with ``dmoe_peer_``):

* ``requests_total{method,status}``: calls of `proto.Method` by gRPC status code, refusals included;
* ``call_seconds{method}``: seconds from a call's arrival to its answer;
* ``wire_seconds{method}``: the part of a call spent outside the experts' queues and compute (decoding and
  checking the request, encoding the answer);
* ``compute_seconds{pass}`` and ``batch_tokens{pass}``: compute time and tokens of each batch (pass: forward or
  backward);
* ``tokens_total{uid,pass}``, ``queue_size{uid}``, ``expert_updates{uid}``, ``expert_updates_skipped{uid}``,
  ``requests_expired_total{uid,pass}``: read from the hosted experts at each scrape;
* ``checkpoint_age_seconds{uid}``: seconds since the expert's checkpoint file was written (with a checkpoint dir);
* ``info{version}``: 1, labelled with the dmoe version.

Several peers may share a process (tests run them in-process), so each `PeerMetrics` has its own
`CollectorRegistry`. Nothing is measured unless the peer was started with a metrics port.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.metadata
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from peer.checkpoints import checkpoint_path
from proto.contract import Method

if TYPE_CHECKING:
    from peer.servicer import HostedExpert

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 … 8192 tokens


def dmoe_version() -> str:
    """The installed dmoe distribution's version ("unknown" when it is run from a bare checkout)."""
    try:
        return importlib.metadata.version("dmoe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class _CallTimer:
    """The intervals one call spent waiting for an expert's queue and compute (several for a ForwardMany)."""

    waits: list[tuple[float, float]] = field(default_factory=list)

    def waited(self) -> float:
        """Seconds covered by the intervals, overlaps counted once."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.waits):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


_CURRENT_CALL: contextvars.ContextVar[_CallTimer | None] = contextvars.ContextVar("dmoe_peer_call", default=None)


@contextlib.contextmanager
def waiting_for_compute() -> Iterator[None]:
    """Marks the enclosed wait (a request in an expert's queue and compute) as not wire time of the current call.

    Does nothing outside a call measured by `PeerMetrics.interceptor` (no metrics port, or no gRPC call).
    """
    timer = _CURRENT_CALL.get()
    if timer is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        timer.waits.append((started, time.perf_counter()))


class PeerMetrics:
    """The metrics of one peer, listed in the module docstring, in `registry` (a new one by default).

    Wiring: `interceptor()` goes first in the gRPC server's interceptors (requests, call and wire seconds);
    `watch(experts, checkpoint_dir)` hooks each expert's batching queues (batch sizes, compute seconds) and reads
    the rest from the experts at scrape time; `serve(host, port)` answers ``GET /metrics`` on a thread of its own
    (port 0 picks a free one, returned); `close()` stops it.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "dmoe_peer_requests", "calls by method and gRPC status", ["method", "status"], registry=self.registry
        )
        self.call_seconds = Histogram(
            "dmoe_peer_call_seconds",
            "seconds from a call's arrival to its answer",
            ["method"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.wire_seconds = Histogram(
            "dmoe_peer_wire_seconds",
            "seconds of a call outside the experts' queues and compute: decoding, checking, encoding",
            ["method"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "dmoe_peer_compute_seconds",
            "compute seconds per batch",
            ["pass"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "dmoe_peer_batch_tokens",
            "tokens per computed batch",
            ["pass"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """A gRPC server interceptor that counts and times every call of `proto.Method`."""
        return _MetricsInterceptor(self)

    def watch(self, experts: Mapping[str, HostedExpert], checkpoint_dir: str | None = None) -> None:
        """Observe every batch of `experts` and report their counters, queues and checkpoint ages at each scrape."""
        for expert in experts.values():
            for pass_name, queue in (("forward", expert.forward_queue), ("backward", expert.backward_queue)):
                queue.on_batch = self._batch_observer(pass_name)
        self.registry.register(_ExpertCollector(experts, checkpoint_dir))

    def _batch_observer(self, pass_name: str) -> Callable[[int, float], None]:
        compute, tokens = self.compute_seconds.labels(pass_name), self.batch_tokens.labels(pass_name)

        def observe(num_tokens: int, seconds: float) -> None:
            compute.observe(seconds)
            tokens.observe(num_tokens)

        return observe

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` at `host`:`port` (0: a free port) on a background thread; returns the bound port."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); choose another --metrics-port"
            ) from None
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        """Stop serving ``/metrics`` (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def record_call(self, method: str, status: str, seconds: float, waited: float) -> None:
        """Count one finished call and its times (`waited`: seconds in queues and compute)."""
        self.requests.labels(method, status).inc()
        self.call_seconds.labels(method).observe(seconds)
        self.wire_seconds.labels(method).observe(max(0.0, seconds - waited))


def _status_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions hand back the raw number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handler of each `proto.Method` call so that its status and times reach `PeerMetrics`."""

    def __init__(self, metrics: PeerMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        """The next handler, wrapped when it serves a method of the dmoe service."""
        handler = await continuation(handler_call_details)
        method = Method.from_path(handler_call_details.method)
        if handler is None or method is None:
            return handler
        return self._wrapped(handler, method.value)

    def _wrapped(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        record = self.metrics.record_call
        codec = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request, context):
                timer, started = _CallTimer(), time.perf_counter()
                token, error = _CURRENT_CALL.set(timer), None
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    _CURRENT_CALL.reset(token)
                    record(name, _status_name(context, error), time.perf_counter() - started, timer.waited())

            return grpc.unary_unary_rpc_method_handler(unary, **codec)
        streaming = handler.stream_stream is not None
        behaviour = handler.stream_stream if streaming else handler.unary_stream
        if behaviour is None:  # a stream-unary method: dmoe has none
            return handler

        async def answers(request_or_stream, context):
            timer, started, error = _CallTimer(), time.perf_counter(), None
            _CURRENT_CALL.set(timer)  # the task serves this call only
            try:
                async for message in behaviour(request_or_stream, context):
                    yield message
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(name, _status_name(context, error), time.perf_counter() - started, timer.waited())

        wrap = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_stream_rpc_method_handler
        return wrap(answers, **codec)


class _ExpertCollector(Collector):
    """Reads the hosted experts' counters, queue lengths and checkpoint ages when scraped."""

    def __init__(self, experts: Mapping[str, HostedExpert], checkpoint_dir: str | None):
        self.experts, self.checkpoint_dir = experts, checkpoint_dir

    def describe(self):
        """No fixed samples to check at registration: they follow the experts."""
        return []

    def collect(self):
        """One sample per expert (and pass) of each family."""
        tokens = CounterMetricFamily("dmoe_peer_tokens", "tokens computed", labels=["uid", "pass"])
        expired = CounterMetricFamily(
            "dmoe_peer_requests_expired", "requests dropped past their deadline", labels=["uid", "pass"]
        )
        queue = GaugeMetricFamily("dmoe_peer_queue_size", "requests waiting for compute", labels=["uid"])
        updates = GaugeMetricFamily("dmoe_peer_expert_updates", "optimizer steps of the expert", labels=["uid"])
        skipped = GaugeMetricFamily("dmoe_peer_expert_updates_skipped", "updates refused", labels=["uid"])
        age = GaugeMetricFamily(
            "dmoe_peer_checkpoint_age_seconds", "seconds since the expert's checkpoint was written", labels=["uid"]
        )
        info = GaugeMetricFamily("dmoe_peer_info", "this peer's dmoe version", labels=["version"])
        info.add_metric([dmoe_version()], 1)
        now = time.time()
        for uid, expert in sorted(self.experts.items()):
            passes = (("forward", expert.forward_queue.stats), ("backward", expert.backward_queue.stats))
            for pass_name, stats in passes:
                tokens.add_metric([uid, pass_name], stats.tokens_processed)
                expired.add_metric([uid, pass_name], stats.requests_expired)
            queue.add_metric([uid], expert.queue_size)
            updates.add_metric([uid], expert.backend.update_count)
            skipped.add_metric([uid], expert.backend.updates_skipped)
            if self.checkpoint_dir:
                try:
                    age.add_metric([uid], max(0.0, now - os.stat(checkpoint_path(self.checkpoint_dir, uid)).st_mtime))
                except OSError:  # not saved yet
                    pass
        return [tokens, expired, queue, updates, skipped, age, info]

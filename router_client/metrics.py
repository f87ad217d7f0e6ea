"""A router's counters as Prometheus metrics, read from its layers when scraped: no hook on the forward path.

`register_router_metrics(layer)` adds a `RemoteMixtureOfExperts` to the process's collector (registered once in
prometheus-client's default registry, or in the `registry` given), which holds it by weak reference, so that a
layer can still be garbage-collected. A training script then serves the figures with, for example,
``prometheus_client.start_http_server(9100)``. What a scrape shows, per layer's uid prefix:

* ``dmoe_router_<counter>_total{prefix}`` for each counter of the layer's `stats` (calls, expert_requests,
  failed_requests, rerouted_tokens, masked_tokens, zero_tokens, backward_requests, backward_failures);
* ``dmoe_router_peer_latency_seconds{endpoint}``: the smoothed latency of successful calls to each peer the
  layers' listings name, from their `PeerScores`;
* ``dmoe_router_peer_banned{endpoint}`` and ``dmoe_router_peer_dead{endpoint}``: 1 while the peer is banned,
  or marked dead after refusing connections.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTER_HELP: dict[str, str] = {
    "calls": "forward calls of the layer",
    "expert_requests": "expert requests sent (one per expert per call)",
    "failed_requests": "expert requests that failed on every replica",
    "rerouted_tokens": "token slots served by a fallback expert after their chosen one failed",
    "masked_tokens": "tokens served by fewer than k experts",
    "zero_tokens": "tokens that got zeros because no expert answered",
    "backward_requests": "backward requests sent",
    "backward_failures": "backward requests that failed",
}
"""The counters of `RemoteMixtureOfExperts.stats`, with their help text (others are exported too)."""


class RouterCollector(Collector):
    """Reads the `stats` counters and `PeerScores` of weakly held router layers at each scrape.

    Layers with the same uid prefix are summed; peer figures are reported once per `PeerScores` object
    (layers of one process usually share one).
    """

    def __init__(self):
        self._layers: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, layer: Any) -> None:
        """Report `layer` (a `RemoteMixtureOfExperts`, or anything with `uid_prefix`, `stats`, `scores`)."""
        with self._lock:
            self._layers.add(layer)

    def layers(self) -> list[Any]:
        """The layers still alive."""
        with self._lock:
            return list(self._layers)

    def describe(self):
        """The fixed families, for the registry's duplicate-name check."""
        counters = [
            CounterMetricFamily(f"dmoe_router_{name}", text, labels=["prefix"]) for name, text in COUNTER_HELP.items()
        ]
        return [*counters, *_peer_families()]

    def collect(self):
        """The counters per prefix and the peer figures per endpoint."""
        totals: dict[str, dict[str, float]] = {}
        peer_scores: dict[int, Any] = {}
        endpoints: dict[int, set[str]] = {}
        for layer in self.layers():
            by_name = totals.setdefault(layer.uid_prefix, {})
            for name, value in dict(layer.stats).items():
                by_name[name] = by_name.get(name, 0) + value
            scores = getattr(layer, "scores", None)
            if scores is not None:
                peer_scores[id(scores)] = scores
                endpoints.setdefault(id(scores), set()).update(_listed_endpoints(layer))
        names = sorted({name for by_name in totals.values() for name in by_name} | set(COUNTER_HELP))
        for name in names:
            family = CounterMetricFamily(
                f"dmoe_router_{name}", COUNTER_HELP.get(name, f"{name} of the layer's stats"), labels=["prefix"]
            )
            for prefix, by_name in sorted(totals.items()):
                family.add_metric([prefix], by_name.get(name, 0))
            yield family
        latency, banned, dead = _peer_families()
        seen: set[str] = set()
        for key, scores in peer_scores.items():
            for endpoint in sorted(endpoints.get(key, ()) | set(scores.banned()) | set(scores.dead())):
                if endpoint in seen:
                    continue
                seen.add(endpoint)
                typical = scores.typical_latency(endpoint)
                if typical is not None:
                    latency.add_metric([endpoint], typical)
                banned.add_metric([endpoint], float(scores.is_banned(endpoint)))
                dead.add_metric([endpoint], float(scores.is_dead(endpoint)))
        yield from (latency, banned, dead)


def _listed_endpoints(layer: Any) -> set[str]:
    """The endpoints of the replicas a layer knows: from its grid index, or from the catalog older layers keep."""
    index = getattr(layer, "index", None)
    if index is not None and hasattr(index, "endpoints"):
        return set(index.endpoints())
    view = getattr(getattr(layer, "catalog", None), "view", None)
    return set(getattr(view, "experts_at", None) or ())


def _peer_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "dmoe_router_peer_latency_seconds", "smoothed seconds of a successful call to the peer", labels=["endpoint"]
        ),
        GaugeMetricFamily("dmoe_router_peer_banned", "1 while the peer is banned after failures", labels=["endpoint"]),
        GaugeMetricFamily(
            "dmoe_router_peer_dead", "1 while the peer is marked dead (it refused connections)", labels=["endpoint"]
        ),
    )


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, RouterCollector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def router_collector(registry: CollectorRegistry = REGISTRY) -> RouterCollector:
    """The one `RouterCollector` of `registry`, registered there on first use."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = RouterCollector()
            registry.register(collector)
        return collector


def register_router_metrics(layer: Any, registry: CollectorRegistry = REGISTRY) -> RouterCollector:
    """Export `layer`'s counters and peer latencies through `registry` (default: prometheus-client's own)."""
    collector = router_collector(registry)
    collector.add(layer)
    return collector

"""The monitor's ``/metrics``: the swarm as the last poll saw it, in Prometheus text format.

Every figure is read from the `SwarmTracker` at scrape time (names start with ``dmoe_swarm_``):
``experts``, ``experts_live``, ``peers``, ``peers_reachable``, ``tokens_per_second``, ``polls_total``,
``dht_up`` (0 while the DHT does not answer); per expert (label ``uid``) ``expert_replicas`` and
``expert_live_replicas``, ``expert_updates``; per peer (labels ``endpoint``, ``peer_id``) ``peer_reachable``,
``peer_tokens_per_second``, ``peer_queue_size`` and ``peer_last_seen_timestamp_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dmoe_cli.monitor.state import SwarmTracker


class SwarmCollector(Collector):
    """Turns `tracker.snapshot()` into metric families on each scrape."""

    def __init__(self, tracker: SwarmTracker):
        self.tracker = tracker

    def describe(self):
        """No fixed samples to check at registration: they follow the swarm."""
        return []

    def collect(self):
        """The swarm, expert and peer families of the module docstring."""
        state = self.tracker.snapshot()
        health = state["health"]

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dmoe_swarm_{name}", text, value=value)

        yield gauge("experts", "experts known: listed now, listed before, or on the grid given", health["experts"])
        yield gauge("experts_live", "experts with at least one reachable replica", health["experts_live"])
        yield gauge("peers", "peers listed in the DHT (and those recently gone)", health["peers"])
        yield gauge("peers_reachable", "peers that answered the last Info call", health["peers_reachable"])
        yield gauge("tokens_per_second", "tokens/s of all reachable peers", health["tokens_per_second"])
        yield gauge("dht_up", "1 when the last DHT listing succeeded", 0.0 if state["dht_error"] else 1.0)
        yield CounterMetricFamily("dmoe_swarm_polls", "looks at the swarm so far", value=state["polls"])

        replicas = GaugeMetricFamily("dmoe_swarm_expert_replicas", "replicas listed in the DHT", labels=["uid"])
        live = GaugeMetricFamily("dmoe_swarm_expert_live_replicas", "replicas whose peer answers", labels=["uid"])
        updates = GaugeMetricFamily("dmoe_swarm_expert_updates", "most updates among live replicas", labels=["uid"])
        for expert in state["experts"]:
            replicas.add_metric([expert["uid"]], expert["replicas"])
            live.add_metric([expert["uid"]], expert["live_replicas"])
            if expert["update_count"] is not None:
                updates.add_metric([expert["uid"]], expert["update_count"])
        yield from (replicas, live, updates)

        labels = ["endpoint", "peer_id"]
        reachable = GaugeMetricFamily("dmoe_swarm_peer_reachable", "1 when the peer answered Info", labels=labels)
        tokens = GaugeMetricFamily("dmoe_swarm_peer_tokens_per_second", "the peer's tokens/s", labels=labels)
        queue = GaugeMetricFamily("dmoe_swarm_peer_queue_size", "requests waiting at the peer", labels=labels)
        seen = GaugeMetricFamily(
            "dmoe_swarm_peer_last_seen_timestamp_seconds", "Unix time of the peer's last Info answer", labels=labels
        )
        for peer in state["peers"]:
            key = [peer["endpoint"], peer["peer_id"]]
            reachable.add_metric(key, float(peer["reachable"]))
            tokens.add_metric(key, peer["tokens_per_second"])
            queue.add_metric(key, peer["queue_size"])
            if peer["last_seen"] is not None:
                seen.add_metric(key, peer["last_seen"])
        yield from (reachable, tokens, queue, seen)


def swarm_registry(tracker: SwarmTracker) -> CollectorRegistry:
    """A registry of its own holding the `SwarmCollector` of `tracker`."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(tracker))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry's samples in Prometheus text format."""
    return generate_latest(registry)

"""Everything a client process shares across its layers: the DHT handle, directory, transport, scores."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from dht import DHTNode, ExpertDirectory
from proto import COMPRESSION_NAMES, COMPRESSION_NONE, channel_credentials
from router_client import background
from router_client.config import RouterConfig
from router_client.dispatch import Dispatcher
from router_client.replicas import PeerScores
from router_client.transport import ExpertTransport
from router_client.verification import Verifier

_lock = threading.Lock()
_nodes: dict[tuple[str, ...], DHTNode] = {}


def get_directory(initial_peers=None, dht=None, *, cache_ttl: float = 5.0) -> ExpertDirectory:
    """An `ExpertDirectory` from what the user gave: a directory, a `DHTNode`, or initial peers to join.

    Client DHT nodes are shared per set of initial peers within a process (client mode: they store nothing).
    """
    if isinstance(dht, ExpertDirectory):
        return dht
    if isinstance(dht, DHTNode):
        return ExpertDirectory(dht, cache_ttl=cache_ttl)
    if dht is not None:
        raise TypeError(f"dht= must be a dht.DHTNode or dht.ExpertDirectory, not {type(dht).__name__}")
    if not initial_peers:
        raise ValueError("pass initial_peers=[multiaddr, ...] (from `dmoe dht` or `dmoe swarm`) or dht=...")
    key = tuple(str(p) for p in initial_peers)
    with _lock:
        node = _nodes.get(key)
        if node is None or not node.is_alive():
            node = _nodes[key] = DHTNode(initial_peers=list(key), client_mode=True)
    return ExpertDirectory(node, cache_ttl=cache_ttl)


@dataclass
class RouterContext:
    """Transport and peer scores shared by the layers of one client (they live on the router's loop)."""

    transport: ExpertTransport
    scores: PeerScores


_contexts: dict[tuple, RouterContext] = {}


def get_context(config: RouterConfig) -> RouterContext:
    """The shared transport (channels reused per endpoint) and peer scores for these router settings."""
    swarm_key = config.swarm_key or os.environ.get("DMOE_SWARM_KEY") or None
    key = (
        config.compression,
        config.max_message_mb,
        config.ban_base,
        config.ban_max,
        swarm_key,
        config.tls_ca,
        config.tls_cert,
        config.tls_key,
    )
    background.get_loop()
    with _lock:
        context = _contexts.get(key)
        if context is None:
            transport = ExpertTransport(
                max_message_bytes=config.max_message_mb << 20,
                compression=COMPRESSION_NAMES.get(config.compression, COMPRESSION_NONE),
                swarm_key=swarm_key,
                credentials=channel_credentials(config.tls_ca, config.tls_cert, config.tls_key),
            )
            scores = PeerScores(ban_base=config.ban_base, ban_max=config.ban_max)
            context = _contexts[key] = RouterContext(transport, scores)
        return context


def make_dispatcher(config: RouterConfig, context: RouterContext) -> Dispatcher:
    """A layer's dispatcher over the client's shared transport and scores, with the hedging, output checks and
    answer verification (`dispatcher.verifier`, None when `verify_fraction` is 0) that `config` asks for."""
    verifier = None
    if config.verify_fraction > 0:
        verifier = Verifier(
            context.transport,
            context.scores,
            fraction=config.verify_fraction,
            tolerance=config.verify_tolerance,
            timeout=config.forward_timeout,
        )
    return Dispatcher(
        context.transport,
        context.scores,
        hedge=config.hedge,
        hedge_min_delay=config.hedge_min_delay,
        check_outputs=config.check_outputs,
        outlier_norm_factor=config.outlier_norm_factor,
        verifier=verifier,
    )

"""Everything a client process shares across its layers: the DHT handle, directory, transport, scores."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from dht import DHTNode, ExpertDirectory
from proto import COMPRESSION_NONE
from router_client import background
from router_client.replicas import PeerScores
from router_client.transport import COMPRESSIONS, ExpertTransport

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


def get_context(
    *, compression: str = "none", max_message_mb: int = 64, ban_base: float = 1.0, ban_max: float = 60.0
) -> RouterContext:
    """The shared transport (channels reused per endpoint) and scores for these settings."""
    key = (compression, max_message_mb, ban_base, ban_max)
    background.get_loop()
    with _lock:
        context = _contexts.get(key)
        if context is None:
            transport = ExpertTransport(
                max_message_bytes=max_message_mb << 20, compression=COMPRESSIONS.get(compression, COMPRESSION_NONE)
            )
            context = _contexts[key] = RouterContext(transport, PeerScores(ban_base=ban_base, ban_max=ban_max))
        return context

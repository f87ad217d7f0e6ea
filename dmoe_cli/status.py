"""`dmoe status`: what a swarm holds under one grid prefix, as a summary that stays short for big grids, the full
listing (`--all`, or when the grid is small) and JSON."""

from __future__ import annotations

import argparse
import collections
import json
import math

from dht import ExpertReplica, split_uid
from dht.libp2p import endpoint_peer_id, transport_of

FULL_LISTING_UP_TO = 32
"""Grids with at most this many experts are listed in full without --all."""


def status_document(prefix: str, experts: dict[str, list[ExpertReplica]], now: float) -> dict:
    """The JSON document of `dmoe status --json`: every expert with its replicas, and the summary."""
    rows = {
        uid: [
            {
                "endpoint": r.endpoint,
                "transport": transport_of(r.endpoint),
                "peer_id": r.peer_id,
                "expert_cls": r.expert_cls,
                "queue_size": r.queue_size,
                "tokens_per_second": r.tokens_per_second,
                "expires_in": round(r.expiration_time - now, 1),
            }
            for r in replicas
        ]
        for uid, replicas in sorted(experts.items(), key=lambda item: split_uid(item[0])[1])
    }
    return {"prefix": prefix, "summary": summarize(experts), "experts": rows}


def summarize(experts: dict[str, list[ExpertReplica]]) -> dict:
    """Experts per peer, a histogram of replicas per expert, and how much of the grid's extent is covered.

    The extent is, per grid dimension, one more than the highest coordinate listed; `coverage` is the share of
    its cells that hold an expert (a hole shows as coverage below 1).
    """
    coords = [split_uid(uid)[1] for uid in experts]
    extent = [max(c[d] for c in coords) + 1 for d in range(len(coords[0]))] if coords else []
    cells = math.prod(extent) if extent else 0
    replicas = collections.Counter(len(rs) for rs in experts.values())
    peers: dict[str, dict] = {}
    for replicas_of_uid in experts.values():
        for r in replicas_of_uid:
            peer = peers.setdefault(
                r.endpoint,
                {"peer_id": r.peer_id, "transport": transport_of(r.endpoint), "experts": 0, "tokens_per_second": 0.0},
            )
            peer["experts"] += 1
            peer["tokens_per_second"] += r.tokens_per_second
    return {
        "experts": len(experts),
        "grid_extent": extent,
        "coverage": round(len(experts) / cells, 4) if cells else 0.0,
        "replicas_histogram": {str(n): replicas[n] for n in sorted(replicas)},
        "peers": {endpoint: peers[endpoint] for endpoint in sorted(peers)},
    }


def print_status(document: dict, *, show_all: bool) -> None:
    """Print the document for people: the summary, then every replica when asked or when the grid is small."""
    summary, rows = document["summary"], document["experts"]
    extent = " x ".join(map(str, summary["grid_extent"]))
    histogram = ", ".join(f"{count} with {n}" for n, count in summary["replicas_histogram"].items())
    print(
        f"{summary['experts']} experts under {document['prefix']!r}: grid {extent}, "
        f"{summary['coverage']:.1%} covered; replicas per expert: {histogram}"
    )
    print(f"  {len(summary['peers'])} peers:")
    print(f"    {'endpoint':<28} {'transport':<9} {'peer':<14} {'experts':>7} {'tok/s':>10}")
    for endpoint, peer in summary["peers"].items():
        print(
            f"    {short_endpoint(endpoint):<28} {peer['transport']:<9} {peer['peer_id'][-12:]:<14} "
            f"{peer['experts']:>7} {peer['tokens_per_second']:>10.1f}"
        )
    if not show_all and len(rows) > FULL_LISTING_UP_TO:
        print(f"  (--all lists all {len(rows)} experts with their replicas)")
        return
    print(f"  {'uid':<16} {'endpoint':<28} {'transport':<9} {'peer':<14} {'queue':>5} {'tok/s':>9} {'expires':>8}")
    for uid, replicas in rows.items():
        for replica in replicas:
            print(
                f"  {uid:<16} {short_endpoint(replica['endpoint']):<28} {replica['transport']:<9} "
                f"{replica['peer_id'][-12:]:<14} {replica['queue_size']:>5} "
                f"{replica['tokens_per_second']:>9.1f} {replica['expires_in']:>7.0f}s"
            )


def short_endpoint(endpoint: str) -> str:
    """`endpoint` for a table: ``host:port`` as it is; a relayed one as ``<relay host:port>~<peer id tail>``
    (``--json`` has the whole multiaddr)."""
    if transport_of(endpoint) == "direct":
        return endpoint
    parts = endpoint.split("/")
    relay = f"{parts[2]}:{parts[4]}" if len(parts) > 4 and parts[3] in ("tcp", "udp") else parts[2]
    return f"{relay}~{endpoint_peer_id(endpoint)[-8:]}"


def print_json(document: dict) -> None:
    """Print the document as JSON."""
    print(json.dumps(document, indent=2))


def add_all_flag(parser: argparse.ArgumentParser) -> None:
    """`--all`: list every expert even for a big grid."""
    parser.add_argument(
        "--all",
        action="store_true",
        help=f"list every expert with its replicas (by default only grids of up to {FULL_LISTING_UP_TO} experts are)",
    )

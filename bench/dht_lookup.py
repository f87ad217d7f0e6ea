"""dht: beam-search lookup latency over a grid of 4096 experts declared across 8 DHT nodes, cold and cached.

Eight `dht.DHTNode`s (hivemind DHT processes on 127.0.0.1) form one DHT; node n declares the experts of rows
8n … 8n+7 of a 64 x 64 grid (`ffn.i.j`, 512 per node, as a peer hosting a block of experts would). A ninth,
client-mode node runs `ExpertDirectory.find_best_experts` for a batch of queries (random scores): *cold* with
``use_cache=False`` (every grid level is a DHT round trip), *cached* with the directory's cache warm (no round
trip at all). Also timed: declaring a node's 512 experts, and listing all 4096.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from bench.common import Side, interleave, summarize


def run(ctx) -> dict:
    from dht import DHTNode, ExpertDirectory

    nodes_count, side = (3, 8) if ctx.quick else (8, 64)
    rows_per_node = side // nodes_count if side % nodes_count == 0 else -(-side // nodes_count)
    query_counts = (1, 64) if ctx.quick else (1, 256)
    k, beam_size = 2, 4
    reps = 5 if ctx.quick else 40
    nodes: list = []
    client = None
    try:
        ctx.log(f"dht: starting {nodes_count} DHT nodes")
        started = time.monotonic()
        first = DHTNode(call_timeout=60.0)
        nodes.append(first)
        bootstrap = first.visible_maddrs()
        rest: list = [None] * (nodes_count - 1)

        def start(index: int) -> None:
            rest[index] = DHTNode(initial_peers=bootstrap, call_timeout=60.0)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(nodes_count - 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        nodes += [node for node in rest if node is not None]
        if len(nodes) != nodes_count:
            raise RuntimeError("a DHT node did not start")
        startup_s = time.monotonic() - started

        declare_s = []
        for index, node in enumerate(nodes):
            rows = range(index * rows_per_node, min(side, (index + 1) * rows_per_node))
            uids = [f"ffn.{i}.{j}" for i in rows for j in range(side)]
            if not uids:
                continue
            began = time.monotonic()
            stored = ExpertDirectory(node).declare(uids, f"127.0.0.1:{20000 + index}", expiration=600, timeout=120)
            declare_s.append(time.monotonic() - began)
            if not all(stored.values()):
                raise RuntimeError(f"node {index} could not store {sum(not ok for ok in stored.values())} records")
        ctx.log(
            f"dht: {side * side} experts declared by {len(declare_s)} nodes "
            f"(median {np.median(declare_s):.2f} s per node)"
        )

        client = DHTNode(initial_peers=bootstrap, client_mode=True, call_timeout=60.0)
        directory = ExpertDirectory(client, cache_ttl=3600.0)
        began = time.monotonic()
        listing = directory.list_experts("ffn", use_cache=False, timeout=120)
        list_s = time.monotonic() - began
        if len(listing) != side * side:
            raise RuntimeError(f"listing found {len(listing)} of {side * side} experts")

        rng = np.random.default_rng(0)
        results = []
        for queries in query_counts:
            scores = [rng.standard_normal((queries, side)).astype(np.float32) for _ in range(2)]
            found = directory.find_best_experts("ffn", scores, k, beam_size=beam_size, use_cache=False)
            if any(len(best) != k for best in found):
                raise RuntimeError("beam search returned fewer experts than asked for")
            sides = [
                Side(
                    "cold",
                    lambda s=scores: directory.find_best_experts("ffn", s, k, beam_size=beam_size, use_cache=False),
                    reps=reps,
                ),
                Side(
                    "cached",
                    lambda s=scores: directory.find_best_experts("ffn", s, k, beam_size=beam_size),
                    reps=reps * 5,
                ),
            ]
            interleave(sides)
            for s in sides:
                results.append({"queries": queries, "cache": s.name, **summarize(s.samples), "errors": s.errors[:2]})
            ctx.log(
                f"dht: {queries} queries: "
                + ", ".join(f"{s.name} p50 {summarize(s.samples)['median'] * 1e3:.2f} ms" for s in sides)
            )
        return {
            "config": {
                "nodes": nodes_count,
                "grid": [side, side],
                "experts": side * side,
                "k": k,
                "beam_size": beam_size,
            },
            "startup_s": startup_s,
            "declare_s_per_node": summarize(declare_s),
            "list_all_s": list_s,
            "rows": results,
            "directory_stats": vars(directory.stats),
        }
    finally:
        for node in ([client] if client is not None else []) + nodes:
            try:
                node.shutdown()
            except Exception:
                pass


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = ["queries", "cache", "p50 ms", "p90 ms", "p99 ms", "n"]
    rows = [
        [r["queries"], r["cache"], r["median"] * 1e3, r["p90"] * 1e3, r["p99"] * 1e3, r["n"]] for r in result["rows"]
    ]
    return headers, rows

"""grid: routing cost per step against the grid's size and the number of DHT nodes, cold and warm.

Grids of 16 (16), 256 (16 x 16), 4096 (64 x 64) and 16384 (128 x 128) experts are declared by 4 DHT nodes (each
owns a block of rows, as a peer hosting a block of experts would; the endpoints are not called: this measures
routing, not experts). A client-mode node routes batches of 256 tokens with `RemoteMixtureOfExperts.route`, the
whole routing work of a forward (beam search over the layer's grid index, candidate scores, the jobs): *cold* is a
fresh layer's first routing (its DHT round trips counted), *warm* a later one (the index cached: no round trip).
Then the 4096 grid on 4, 8, 16 and 32 DHT nodes: cold routing, its round trips, and a lookup of one small key
(the grid's root prefix, latest copy from every node holding it): the cost of a trip through the DHT without
payload, fitted to a + b log2(nodes) to project larger swarms.
Routing is measured as users run it: default router settings (k 2, beam size k + 2, 16 fallback candidates).
"""

from __future__ import annotations

import math
import threading
import time

import msgpack
import torch

from bench.common import summarize


def run(ctx) -> dict:
    grids = [(16,), (16, 16)] if ctx.quick else [(16,), (16, 16), (64, 64), (128, 128)]
    node_counts = [2, 4] if ctx.quick else [4, 8, 16, 32]
    nodes_grid = (16, 16) if ctx.quick else (64, 64)
    tokens = 64 if ctx.quick else 256
    cold_reps, warm_reps = (2, 10) if ctx.quick else (5, 50)
    torch.set_num_threads(1)  # routing works on small tensors: intra-op threads only add wake-up latency
    rows = []
    with _Swarm(node_counts[0] if ctx.quick else 4, ctx) as swarm:
        for grid in grids:
            swarm.declare(grid)
            rows.append(
                {"grid": list(grid), "experts": math.prod(grid), **swarm.measure(grid, tokens, cold_reps, warm_reps)}
            )
            ctx.log(
                f"grid {grid}: cold {rows[-1]['cold_ms']['median']:.1f} ms, warm {rows[-1]['warm_ms']['median']:.2f} ms"
            )
    by_nodes = []
    for count in node_counts:
        with _Swarm(count, ctx) as swarm:
            swarm.declare(nodes_grid)
            measured = swarm.measure(nodes_grid, tokens, cold_reps, warm_reps)
            by_nodes.append({"nodes": count, "experts": math.prod(nodes_grid), **measured})
            ctx.log(f"{count} nodes: cold {measured['cold_ms']['median']:.1f} ms in {measured['cold_rounds']} rounds")
    fit = _log_fit([(r["nodes"], r["root_lookup_ms"]["median"]) for r in by_nodes])
    return {
        "config": {
            "tokens": tokens,
            "k": 2,
            "beam_size": 4,
            "fallbacks": 16,
            "nodes_for_grids": 4,
            "nodes_grid": list(nodes_grid),
        },
        "grids": rows,
        "nodes": by_nodes,
        "round_ms_fit": fit,
        "round_ms_projected": {str(n): round(fit["a"] + fit["b"] * math.log2(n), 1) for n in (1000, 10000)},
        "record_bytes": _record_bytes(),
    }


class _Swarm:
    """`count` DHT nodes on 127.0.0.1 that declare grids, and a client-mode node that routes over them."""

    def __init__(self, count: int, ctx):
        self.count, self.ctx = count, ctx
        self.nodes: list = []
        self.client = None

    def __enter__(self) -> _Swarm:
        from dht import DHTNode

        self.ctx.log(f"grid: starting {self.count} DHT nodes")
        first = DHTNode(call_timeout=120.0)
        self.nodes.append(first)
        rest: list = [None] * (self.count - 1)

        def start(index: int) -> None:
            rest[index] = DHTNode(initial_peers=first.visible_maddrs(), call_timeout=120.0)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(self.count - 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.nodes += [node for node in rest if node is not None]
        if len(self.nodes) != self.count:
            raise RuntimeError("a DHT node did not start")
        self.client = DHTNode(initial_peers=first.visible_maddrs(), client_mode=True, call_timeout=120.0)
        return self

    def __exit__(self, *exc) -> None:
        for node in [self.client, *self.nodes]:
            if node is not None:
                node.shutdown()

    def declare(self, grid: tuple[int, ...]) -> None:
        """Every expert of `grid` under its own name, rows split in blocks over the nodes."""
        from dht import ExpertDirectory

        name = _name(grid)
        first_dim = grid[0]
        per_node = -(-first_dim // len(self.nodes))
        for index, node in enumerate(self.nodes):
            block = range(index * per_node, min(first_dim, (index + 1) * per_node))
            uids = [f"{name}.{i}" + "".join(f".{j}" for j in rest) for i in block for rest in _cells(grid[1:])]
            if uids:
                stored = ExpertDirectory(node).declare(uids, f"127.0.0.1:{20000 + index}", expiration=900, timeout=300)
                if not all(stored.values()):
                    raise RuntimeError(f"node {index} could not declare its experts of {name}")

    def measure(self, grid: tuple[int, ...], tokens: int, cold_reps: int, warm_reps: int) -> dict:
        """Cold and warm routing of `tokens` tokens over `grid`, through fresh layers."""
        from dht import ExpertDirectory
        from router_client import RemoteMixtureOfExperts

        cold, warm, rounds, known = [], [], [], 0
        for rep in range(cold_reps):
            directory = ExpertDirectory(self.client, cache_ttl=0.0)
            torch.manual_seed(rep)
            layer = RemoteMixtureOfExperts(16, grid, _name(grid), 2, dht=directory, cache_ttl=3600.0)
            x = torch.randn(tokens, 16)
            with torch.no_grad():
                logits = layer.gate(x).split(layer.grid_size, dim=-1)
                began = time.perf_counter()
                routed = layer.route(logits, time.monotonic() + 120.0)
                cold.append((time.perf_counter() - began) * 1e3)
                rounds.append(directory.stats.dht_rounds)
                if routed is None or not routed[2]:
                    raise RuntimeError(f"routing over {grid} found no experts")
                known = layer.index.num_known
                for _ in range(warm_reps if rep == 0 else 0):
                    logits = layer.gate(torch.randn(tokens, 16)).split(layer.grid_size, dim=-1)
                    began = time.perf_counter()
                    layer.route(logits, time.monotonic() + 120.0)
                    warm.append((time.perf_counter() - began) * 1e3)
        lookups = []
        directory = ExpertDirectory(self.client, cache_ttl=0.0)
        for _ in range(max(5, cold_reps)):  # one small key: what a hop through the DHT costs, without payload
            began = time.perf_counter()
            directory.read_grid_prefixes([_name(grid) + "."], len(grid), use_cache=False, timeout=120.0)
            lookups.append((time.perf_counter() - began) * 1e3)
        return {
            "cold_ms": summarize(cold),
            "warm_ms": summarize(warm),
            "cold_rounds": max(rounds),
            "experts_known_after_cold": known,
            "root_lookup_ms": summarize(lookups),
        }


def _name(grid: tuple[int, ...]) -> str:
    return "g" + "x".join(map(str, grid))


def _cells(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    cells: list[tuple[int, ...]] = [()]
    for size in grid:
        cells = [(*cell, c) for cell in cells for c in range(size)]
    return cells


def _log_fit(points: list[tuple[int, float]]) -> dict:
    """Least squares of ms = a + b * log2(nodes)."""
    xs = [math.log2(n) for n, _ in points]
    ys = [ms for _, ms in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return {"a": round(mean_y - b * mean_x, 2), "b": round(b, 2)}


def _record_bytes() -> dict:
    """What records weigh on the wire and in a DHT node's storage (value, sub-key, signature): a row record of 64
    experts of one peer, and an inner prefix record."""
    from hivemind.utils.crypto import RSAPrivateKey

    from dht.records import (
        expert_subkey,
        make_expert_value,
        make_prefix_value,
        make_row_value,
        owner_marker,
        prefix_subkey,
    )

    key = RSAPrivateKey()
    marker = owner_marker(key.get_public_key().to_bytes())
    peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    signature = len(b"[signature:]") + len(key.sign(b"x"))
    row = make_row_value([f"ffn.3.{j}" for j in range(64)], make_expert_value("203.0.113.5:31337", peer, "ffn"))
    row_bytes = len(msgpack.packb(row)) + len(msgpack.packb(expert_subkey(peer, marker))) + signature
    inner = len(msgpack.packb(make_prefix_value("ffn.3.0"))) + len(msgpack.packb(prefix_subkey(3, peer, marker)))
    return {
        "row_record_64_experts": row_bytes,
        "per_expert_in_a_row_of_64": round(row_bytes / 64, 1),
        "inner_prefix_record": inner + signature,
        "signature": signature,
    }


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = [
        "case",
        "experts",
        "DHT nodes",
        "cold routing ms (p50)",
        "DHT round trips",
        "warm routing ms (p50)",
        "warm p90 ms",
        "one-key lookup ms",
    ]
    rows = []
    for r in result["grids"]:
        grid = " x ".join(map(str, r["grid"]))
        rows.append(
            [
                f"grid {grid}",
                r["experts"],
                result["config"]["nodes_for_grids"],
                r["cold_ms"]["median"],
                r["cold_rounds"],
                r["warm_ms"]["median"],
                r["warm_ms"]["p90"],
                r.get("root_lookup_ms", {}).get("median"),
            ]
        )
    for r in result["nodes"]:
        rows.append(
            [
                f"{r['nodes']} nodes",
                r["experts"],
                r["nodes"],
                r["cold_ms"]["median"],
                r["cold_rounds"],
                r["warm_ms"]["median"],
                r["warm_ms"]["p90"],
                r.get("root_lookup_ms", {}).get("median"),
            ]
        )
    return headers, rows


def extra(result: dict) -> str:
    """The line under the table: the log fit, its projection, and what records cost."""
    fit, projected, sizes = result["round_ms_fit"], result["round_ms_projected"], result["record_bytes"]
    return (
        f"{result['config']['tokens']} tokens per batch, k {result['config']['k']}, beam size "
        f"{result['config']['beam_size']}. A one-key lookup fits {fit['a']} + {fit['b']} x log2(nodes) ms; "
        f"projected: {projected['1000']} ms at 1,000 nodes and {projected['10000']} ms at 10,000 (Kademlia: hops "
        f"grow as log2 N). A 2-d grid costs 2 round trips cold and none warm. Records: a peer's row record of 64 "
        f"experts is {sizes['row_record_64_experts']} bytes with its sub-key and signature ({sizes['signature']} of "
        f"them signature), {sizes['per_expert_in_a_row_of_64']} bytes per expert; an inner prefix record "
        f"{sizes['inner_prefix_record']}."
    )


def plot(result: dict, path, plt) -> None:
    """Routing ms against grid size, and against DHT nodes, cold and warm (log scales)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=72)
    grids = result["grids"]
    xs = [r["experts"] for r in grids]
    axes[0].plot(xs, [r["cold_ms"]["median"] for r in grids], marker="o", label="cold (DHT round trips)")
    axes[0].plot(xs, [r["warm_ms"]["median"] for r in grids], marker="o", label="warm (cached index)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("experts in the grid")
    axes[0].set_title(f"routing {result['config']['tokens']} tokens, {result['config']['nodes_for_grids']} DHT nodes")
    nodes = result["nodes"]
    ns = [r["nodes"] for r in nodes]
    axes[1].plot(ns, [r["cold_ms"]["median"] for r in nodes], marker="o", label="cold")
    axes[1].plot(ns, [r["warm_ms"]["median"] for r in nodes], marker="o", label="warm")
    fit = result["round_ms_fit"]
    axes[1].plot(ns, [r["root_lookup_ms"]["median"] for r in nodes], marker="o", label="one-key lookup")
    axes[1].plot(ns, [fit["a"] + fit["b"] * math.log2(n) for n in ns], linestyle="--", label="its a + b log2 N fit")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("DHT nodes")
    axes[1].set_title(f"routing over {nodes[0]['experts']} experts")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("ms per routing")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)

"""latency: p50/p95/p99 of one forward of 1 and 16 tokens through the router, dmoe vs hivemind vs in-process.

At hidden 1024 (experts that compute) and hidden 64 (tiny experts: the figure is pure overhead). One compute
thread on every side. `overhead = dmoe p50 - in-process p50` is what the router, the network and the peer add;
the sides of a row run interleaved in the same run. Two kinds of rows:

* **fixed**: the gate sends every token to the same two experts on every side (hivemind routes a sequence as a
  whole; this makes the work identical), so the in-process figure is exactly the time of those two experts;
* **spread**: the gate as it is after initialisation, which spreads 16 tokens over most of the 16 experts
  (k = 2, the router's strict `allow_zero_outputs=False`), against one peer hosting all 16 experts and against
  four peers hosting 4 each; the in-process side computes the same experts with the same selection.
"""

from __future__ import annotations

import torch

from bench.clients import HivemindClient, dmoe_layer, make_gate
from bench.common import Side, interleave, percentile, summarize
from bench.local_moe import LocalMoE, make_backends
from bench.servers import DmoeGroup, HivemindServer, start_all, stop_all

K = 2
FIXED = (3, 5)  # the two experts every token goes to in the fixed rows
SPREAD_TOKENS = 16
SPREAD_PEERS = (1, 4)  # the spread rows run against one peer and against four


def run(ctx) -> dict:
    threads = 1
    num_experts = 8 if ctx.quick else 16
    torch.set_num_threads(threads)
    hiddens = {"ffn": 1024, "tiny": 64}
    token_counts = (1, 16)
    reps, hivemind_reps, budget = (30, 10, 3.0) if ctx.quick else (400, 60, 15.0)

    groups = {
        (prefix, peers): DmoeGroup(
            f"latency-{prefix}-{peers}",
            _assignments(prefix, num_experts, peers),
            hidden_dim=hidden,
            compute_threads=threads,
        )
        for prefix, hidden in hiddens.items()
        for peers in SPREAD_PEERS
    }
    server = HivemindServer(
        {p: (num_experts, h) for p, h in hiddens.items()}, threads=threads, handlers=4 if ctx.quick else 8
    )
    hivemind_client = None
    rows = []
    try:
        ctx.log(f"latency: starting {sum(SPREAD_PEERS) * len(hiddens)} dmoe peers and a hivemind server")
        start_all(server, *groups.values())
        hivemind_client = HivemindClient(server.initial_peers, call_timeout=60.0)
        for prefix, hidden in hiddens.items():
            backends = make_backends(prefix, num_experts, hidden)
            rows += _fixed_rows(
                ctx,
                groups[prefix, 1],
                hivemind_client,
                prefix,
                hidden,
                num_experts,
                backends,
                token_counts,
                reps,
                hivemind_reps,
                budget,
            )
            rows.append(_spread_row(ctx, groups, prefix, hidden, num_experts, backends, reps, budget))
    finally:
        if hivemind_client is not None:
            hivemind_client.shutdown()
        stop_all(server, *groups.values())

    return {
        "config": {
            "experts": num_experts,
            "k": K,
            "threads": threads,
            "routed_to": list(FIXED),
            "spread_tokens": SPREAD_TOKENS,
            "spread_peers": list(SPREAD_PEERS),
            "reps": reps,
            "hivemind_reps": hivemind_reps,
        },
        "rows": rows,
        "targets": _targets(rows),
    }


def _assignments(prefix: str, num_experts: int, peers: int) -> list[str]:
    """Expert patterns of `peers` peers that share `prefix.0 … prefix.(n-1)` in equal, contiguous ranges."""
    per_peer = num_experts // peers
    return [f"{prefix}.[{i * per_peer}:{(i + 1) * per_peer}]" for i in range(peers)]


def _fixed_rows(
    ctx, group, hivemind_client, prefix, hidden, num_experts, backends, token_counts, reps, hivemind_reps, budget
) -> list[dict]:
    gate = make_gate(hidden, num_experts, fixed=FIXED)
    local = LocalMoE(gate, backends, K)
    dmoe = _layer(group, hidden, prefix, num_experts, gate)
    hivemind = hivemind_client.layer(hidden, prefix, num_experts, K, gate)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, hidden)
        layers = {"dmoe": dmoe, "hivemind": hivemind}
        diffs = _diffs(local, layers, x)
        sides = [
            Side("in-process", _forward(local, x), reps=reps, budget=budget, warmup=3),
            Side("dmoe", _forward(dmoe, x), reps=reps, budget=budget, warmup=3),
            Side("hivemind", _forward(hivemind, x), reps=hivemind_reps, budget=budget, warmup=2),
        ]
        interleave(sides)
        figures = _figures(sides)
        local_p50 = figures["in-process"]["median"]
        rows.append(
            {
                "routing": "fixed",
                "hidden": hidden,
                "tokens": tokens,
                "experts_used": len(FIXED),
                "sides": figures,
                "max_abs_diff": diffs,
                "dmoe_overhead_ms": (figures["dmoe"]["median"] - local_p50) * 1e3,
                "hivemind_overhead_ms": (figures["hivemind"]["median"] - local_p50) * 1e3,
            }
        )
        _log(ctx, rows[-1])
    return rows


def _spread_row(ctx, groups, prefix, hidden, num_experts, backends, reps, budget) -> dict:
    """16 tokens routed by an initialised gate, against one peer and four, with the in-process limit."""
    gate = make_gate(hidden, num_experts)
    local = LocalMoE(gate, backends, K)
    layers = {
        f"dmoe, {peers} peer{'s' if peers > 1 else ''}": _layer(
            groups[prefix, peers], hidden, prefix, num_experts, gate
        )
        for peers in SPREAD_PEERS
    }
    x = torch.randn(SPREAD_TOKENS, hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        experts_used = int(local.route(x)[1].unique().numel())
    diffs = _diffs(local, layers, x)
    sides = [Side("in-process", _forward(local, x), reps=reps, budget=budget, warmup=3)]
    sides += [Side(name, _forward(layer, x), reps=reps, budget=budget, warmup=3) for name, layer in layers.items()]
    interleave(sides)
    figures = _figures(sides)
    local_p50 = figures["in-process"]["median"]
    row = {
        "routing": "spread",
        "hidden": hidden,
        "tokens": SPREAD_TOKENS,
        "experts_used": experts_used,
        "sides": figures,
        "max_abs_diff": diffs,
        "overhead_ms": {name: (figures[name]["median"] - local_p50) * 1e3 for name in layers},
    }
    _log(ctx, row)
    return row


def _layer(group, hidden, prefix, num_experts, gate):
    layer = dmoe_layer(group.initial_peers, hidden, prefix, num_experts, K, gate, timeout_after_k_min=120.0)
    layer.eval()  # inference: no load-balancing loss
    return layer


def _diffs(local, layers: dict, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        reference = local.infer(x)
        return {name: float((layer(x) - reference).abs().max()) for name, layer in layers.items()}


def _figures(sides: list[Side]) -> dict[str, dict]:
    return {
        side.name: {**summarize(side.samples), "p95": percentile(side.samples, 95), "errors": side.errors[:3]}
        for side in sides
    }


def _log(ctx, row: dict) -> None:
    ctx.log(
        f"latency: {row['routing']}, hidden {row['hidden']}, {row['tokens']} tokens over {row['experts_used']} "
        "experts: " + ", ".join(f"{name} p50 {f['median'] * 1e3:.2f} ms" for name, f in row["sides"].items())
    )


def _forward(layer, x: torch.Tensor):
    def forward() -> None:
        with torch.no_grad():
            layer(x)

    return forward


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        if row["routing"] == "spread":
            overhead = row["overhead_ms"]["dmoe, 1 peer"]
            out.append(
                {
                    "name": f"router overhead, {row['tokens']} tokens spread over {row['experts_used']} experts on "
                    f"one peer, hidden {row['hidden']} (dmoe p50 - in-process)",
                    "value": overhead,
                    "target": "<= 2 ms",
                    "met": overhead <= 2,
                }
            )
            continue
        if row["tokens"] == 16 and row["hidden"] == 1024:
            out.append(
                {
                    "name": "router overhead, 16 tokens, hidden 1024 (dmoe p50 - in-process)",
                    "value": row["dmoe_overhead_ms"],
                    "target": "<= 2 ms",
                    "met": row["dmoe_overhead_ms"] <= 2,
                }
            )
        if row["hidden"] == 64:
            p50 = row["sides"]["dmoe"]["median"] * 1e3
            out.append(
                {
                    "name": f"dmoe p50, {row['tokens']} tokens, hidden 64",
                    "value": p50,
                    "target": "<= 1.5 ms",
                    "met": p50 <= 1.5,
                }
            )
    return out


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = [
        "routing",
        "hidden",
        "tokens",
        "in-process p50 ms",
        "dmoe side",
        "dmoe p50 ms",
        "dmoe p95 ms",
        "dmoe p99 ms",
        "dmoe overhead ms",
        "hivemind p50 ms",
        "hivemind p99 ms",
        "hivemind overhead ms",
        "hivemind / dmoe",
    ]
    rows = []
    for row in result["rows"]:
        s = row["sides"]
        local = s["in-process"]["median"] * 1e3
        if row.get("routing", "fixed") == "fixed":
            dmoe, hivemind = s["dmoe"], s["hivemind"]
            rows.append(
                [
                    f"fixed {len(FIXED)} experts",
                    row["hidden"],
                    row["tokens"],
                    local,
                    "dmoe, 1 peer",
                    dmoe["median"] * 1e3,
                    dmoe.get("p95", float("nan")) * 1e3,
                    dmoe["p99"] * 1e3,
                    row["dmoe_overhead_ms"],
                    hivemind["median"] * 1e3,
                    hivemind["p99"] * 1e3,
                    row["hivemind_overhead_ms"],
                    (hivemind["median"] or float("nan")) / (dmoe["median"] or float("nan")),
                ]
            )
            continue
        for name, overhead in row["overhead_ms"].items():
            side = s[name]
            rows.append(
                [
                    f"spread over {row['experts_used']} experts",
                    row["hidden"],
                    row["tokens"],
                    local,
                    name,
                    side["median"] * 1e3,
                    side["p95"] * 1e3,
                    side["p99"] * 1e3,
                    overhead,
                    None,
                    None,
                    None,
                    None,
                ]
            )
    return headers, rows

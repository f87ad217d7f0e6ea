"""latency: p50/p99 of one forward of 1 and 16 tokens through the router, dmoe vs hivemind vs in-process.

At hidden 1024 (experts that compute) and hidden 64 (tiny experts: the figure is pure overhead). One compute
thread on every side. The gate sends every token to the same two experts on every side (hivemind routes a
sequence as a whole; this makes the work identical), so the in-process figure is exactly the time of those
two experts, and `overhead = dmoe p50 - in-process p50` is what the router, the network and the peer add.
"""

from __future__ import annotations

import torch

from bench.clients import HivemindClient, dmoe_layer, make_gate
from bench.common import Side, interleave, summarize
from bench.local_moe import LocalMoE, make_backends
from bench.servers import DmoeGroup, HivemindServer, start_all, stop_all

K = 2
FIXED = (3, 5)  # the two experts every token goes to


def run(ctx) -> dict:
    threads = 1
    num_experts = 8 if ctx.quick else 16
    torch.set_num_threads(threads)
    hiddens = {"ffn": 1024, "tiny": 64}
    token_counts = (1, 16)
    reps, hivemind_reps, budget = (30, 10, 3.0) if ctx.quick else (400, 60, 15.0)

    groups = {
        prefix: DmoeGroup(
            f"latency-{prefix}", [f"{prefix}.[0:{num_experts}]"], hidden_dim=hidden, compute_threads=threads
        )
        for prefix, hidden in hiddens.items()
    }
    server = HivemindServer(
        {p: (num_experts, h) for p, h in hiddens.items()}, threads=threads, handlers=4 if ctx.quick else 8
    )
    hivemind_client = None
    rows = []
    try:
        ctx.log("latency: starting 2 dmoe peers and a hivemind server")
        start_all(server, *groups.values())
        hivemind_client = HivemindClient(server.initial_peers, call_timeout=60.0)
        for prefix, hidden in hiddens.items():
            gate = make_gate(hidden, num_experts, fixed=FIXED)
            local = LocalMoE(gate, make_backends(prefix, num_experts, hidden), K)
            dmoe = dmoe_layer(
                groups[prefix].initial_peers, hidden, prefix, num_experts, K, gate, timeout_after_k_min=120.0
            )
            dmoe.eval()  # inference: no load-balancing loss
            hivemind = hivemind_client.layer(hidden, prefix, num_experts, K, gate)
            for tokens in token_counts:
                x = torch.randn(tokens, hidden)
                with torch.no_grad():
                    reference = local.infer(x)
                    diffs = {
                        "dmoe": float((dmoe(x) - reference).abs().max()),
                        "hivemind": float((hivemind(x) - reference).abs().max()),
                    }

                sides = [
                    Side("in-process", _forward(local, x), reps=reps, budget=budget, warmup=3),
                    Side("dmoe", _forward(dmoe, x), reps=reps, budget=budget, warmup=3),
                    Side("hivemind", _forward(hivemind, x), reps=hivemind_reps, budget=budget, warmup=2),
                ]
                interleave(sides)
                figures = {side.name: {**summarize(side.samples), "errors": side.errors[:3]} for side in sides}
                local_p50 = figures["in-process"]["median"]
                row = {
                    "hidden": hidden,
                    "tokens": tokens,
                    "sides": figures,
                    "max_abs_diff": diffs,
                    "dmoe_overhead_ms": (figures["dmoe"]["median"] - local_p50) * 1e3,
                    "hivemind_overhead_ms": (figures["hivemind"]["median"] - local_p50) * 1e3,
                }
                rows.append(row)
                ctx.log(
                    f"latency: hidden {hidden}, {tokens} tokens: "
                    + ", ".join(f"{name} p50 {f['median'] * 1e3:.2f} ms" for name, f in figures.items())
                )
    finally:
        if hivemind_client is not None:
            hivemind_client.shutdown()
        stop_all(server, *groups.values())

    targets = _targets(rows)
    return {
        "config": {
            "experts": num_experts,
            "k": K,
            "threads": threads,
            "routed_to": list(FIXED),
            "reps": reps,
            "hivemind_reps": hivemind_reps,
        },
        "rows": rows,
        "targets": targets,
    }


def _forward(layer, x: torch.Tensor):
    def forward() -> None:
        with torch.no_grad():
            layer(x)

    return forward


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
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
        "hidden",
        "tokens",
        "in-process p50 ms",
        "dmoe p50 ms",
        "dmoe p99 ms",
        "hivemind p50 ms",
        "hivemind p99 ms",
        "dmoe overhead ms",
        "hivemind overhead ms",
        "hivemind / dmoe",
    ]
    rows = []
    for row in result["rows"]:
        s = row["sides"]
        rows.append(
            [
                row["hidden"],
                row["tokens"],
                s["in-process"]["median"] * 1e3,
                s["dmoe"]["median"] * 1e3,
                s["dmoe"]["p99"] * 1e3,
                s["hivemind"]["median"] * 1e3,
                s["hivemind"]["p99"] * 1e3,
                row["dmoe_overhead_ms"],
                row["hivemind_overhead_ms"],
                (s["hivemind"]["median"] or float("nan")) / (s["dmoe"]["median"] or float("nan")),
            ]
        )
    return headers, rows

"""layer: tokens/s of one MoE layer (expert `ffn`, hidden 1024, 16 experts, top-2), training and inference.

Contenders, all in this process run and interleaved round by round:

* ``in-process``: the limit, a top-2 MoE over the same experts in this process (`bench.local_moe`):
  forward that keeps its activations, backward, per-expert clipping and Adam step;
* ``in-process, same work``: the same in-process experts doing exactly what a remote expert does (a forward
  without graph, then on backward a recomputed forward, its backward and the Adam step);
* ``dmoe, 1 peer`` and ``dmoe, 4 peers``: `router_client.RemoteMixtureOfExperts` over peer processes;
* ``hivemind``: `hivemind.moe.RemoteMixtureOfExperts` over a `hivemind.moe.Server` process.

Training: forward + backward of the layer for a batch of tokens (the gradient of a fixed random loss); each
expert steps its own optimizer on every side. Inference: a forward without grad. Every side uses the same
gate weights, so routing is identical, and the same expert weights (checked: outputs agree at the start).
"""

from __future__ import annotations

import math

import torch

from bench.clients import HivemindClient, dmoe_layer, make_gate
from bench.common import Side, interleave, ratio, summarize
from bench.local_moe import LocalMoE, make_backends
from bench.servers import DmoeGroup, HivemindServer, start_all, stop_all

PREFIX, K = "ffn", 2


def _config(ctx) -> dict:
    if ctx.quick:
        return {
            "hidden": 64,
            "experts": 8,
            "batches": [16, 64],
            "multi_peers": 2,
            "reps": {16: 2, 64: 2},
            "budget": 1.0,
            "hivemind_budget": 1.0,
            "handlers": 4,
        }
    return {
        "hidden": 1024,
        "experts": 16,
        "batches": [64, 512, 4096],
        "multi_peers": 4,
        "reps": {64: 7, 512: 5, 4096: 3},
        "budget": 10.0,
        "hivemind_budget": 15.0,
        "handlers": 16,
    }


def run(ctx) -> dict:
    config = _config(ctx)
    results = {"config": config, "devices": {}}
    results["devices"]["cpu"] = _run_device(ctx, config, "cpu")
    if ctx.cuda:
        results["devices"]["cuda"] = _run_device(ctx, config, "cuda")
    else:
        results["cuda_note"] = "no CUDA device on this machine: the GPU variant of the layer benchmark did not run"
        ctx.log("layer: " + results["cuda_note"])
    results["targets"] = _targets(results["devices"]["cpu"])
    return results


def _run_device(ctx, config: dict, device: str) -> dict:
    hidden, num_experts, threads = config["hidden"], config["experts"], ctx.threads
    multi = config["multi_peers"]
    torch.set_num_threads(threads)
    per_peer = num_experts // multi
    one = DmoeGroup(
        f"layer-{device}-1", [f"{PREFIX}.[0:{num_experts}]"], hidden_dim=hidden, compute_threads=threads, device=device
    )
    many = DmoeGroup(
        f"layer-{device}-{multi}",
        [f"{PREFIX}.[{i * per_peer}:{(i + 1) * per_peer}]" for i in range(multi)],
        hidden_dim=hidden,
        compute_threads=max(1, threads // multi),
        device=device,
    )
    server = HivemindServer(
        {PREFIX: (num_experts, hidden)}, threads=threads, device=device, handlers=config["handlers"]
    )
    client = None
    rows = []
    try:
        ctx.log(f"layer[{device}]: starting dmoe peers (1 and {multi}) and a hivemind server")
        start_all(server, one, many)
        gate = make_gate(hidden, num_experts)
        local = LocalMoE(gate, make_backends(PREFIX, num_experts, hidden, device=device), K, device=device)
        client = HivemindClient(server.initial_peers)
        layers = {
            "dmoe, 1 peer": dmoe_layer(
                one.initial_peers, hidden, PREFIX, num_experts, K, gate, timeout_after_k_min=120.0
            ),
            f"dmoe, {multi} peers": dmoe_layer(
                many.initial_peers, hidden, PREFIX, num_experts, K, gate, timeout_after_k_min=120.0
            ),
            "hivemind": client.layer(hidden, PREFIX, num_experts, K, gate),
        }
        for layer in layers.values():
            layer.train()
        diffs = _agreement(local, layers, hidden)
        ctx.log(f"layer[{device}]: outputs against in-process (max abs diff): {diffs}")
        for mode in ("train", "infer"):
            for batch in config["batches"]:
                rows.append(_measure(ctx, config, local, layers, gate, mode, batch, hidden))
    finally:
        if client is not None:
            client.shutdown()
        stop_all(server, one, many)
    return {
        "rows": rows,
        "max_abs_diff": diffs,
        "threads": {
            "client_and_in_process": threads,
            "dmoe_1_peer": threads,
            f"dmoe_{multi}_peers_each": max(1, threads // multi),
            "hivemind_server": threads,
        },
    }


def _agreement(local: LocalMoE, layers: dict, hidden: int) -> dict:
    x = torch.randn(32, hidden)
    with torch.no_grad():
        reference = local.infer(x)
        return {name: float((layer(x) - reference).abs().max()) for name, layer in layers.items()}


def _measure(ctx, config, local: LocalMoE, layers: dict, gate, mode: str, batch: int, hidden: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, hidden, generator=generator)
    grad = torch.randn(batch, hidden, generator=generator) / math.sqrt(batch * hidden)
    reps, budget = config["reps"][batch], config["budget"]
    # hivemind sends one request per token and expert: at 4096 tokens one step takes about a minute, so it gets
    # a single timed repetition there, without a warm-up
    hivemind_reps, hivemind_warmup = (1, 0) if batch >= 4096 else (reps, 1)
    params = [p for layer in [local, *layers.values()] for p in layer.parameters() if p.requires_grad]

    def zero_grads() -> None:
        for p in params:
            p.grad = None

    def remote_train(layer):
        leaf = x.clone().requires_grad_()
        layer(leaf).backward(grad)

    def remote_infer(layer):
        with torch.no_grad():
            layer(x)

    if mode == "train":
        sides = [
            Side(
                "in-process",
                lambda: local.train_step(x.clone().requires_grad_(), grad, "autograd"),
                reps=reps,
                budget=budget,
                setup=zero_grads,
            ),
            Side(
                "in-process, same work",
                lambda: local.train_step(x.clone().requires_grad_(), grad, "recompute"),
                reps=reps,
                budget=budget,
                setup=zero_grads,
            ),
        ]
        sides += [
            Side(
                name,
                lambda layer=layer: remote_train(layer),
                reps=reps,
                setup=zero_grads,
                budget=config["hivemind_budget"] if name == "hivemind" else budget,
                min_reps=1 if name == "hivemind" else 2,
            )
            for name, layer in layers.items()
        ]
    else:
        sides = [Side("in-process", lambda: local.infer(x), reps=reps, budget=budget)]
        sides += [
            Side(
                name,
                lambda layer=layer: remote_infer(layer),
                reps=reps,
                budget=config["hivemind_budget"] if name == "hivemind" else budget,
                min_reps=1 if name == "hivemind" else 2,
            )
            for name, layer in layers.items()
        ]
    for side in sides:
        if side.name == "hivemind":
            side.reps, side.warmup = min(side.reps, hivemind_reps), hivemind_warmup
    interleave(sides)
    figures = {}
    for side in sides:
        stats = summarize(side.samples)
        stats["tokens_per_s"] = batch / stats["median"] if side.samples else math.nan
        stats["errors"] = side.errors[:3]
        figures[side.name] = stats
    limit = figures["in-process"]["tokens_per_s"]
    for stats in figures.values():
        stats["vs_limit"] = ratio(stats["tokens_per_s"], limit)
        stats["vs_hivemind"] = ratio(stats["tokens_per_s"], figures["hivemind"]["tokens_per_s"])
    ctx.log(
        f"layer: {mode} batch {batch}: "
        + ", ".join(f"{name} {f['tokens_per_s']:.0f} tok/s" for name, f in figures.items())
    )
    return {"mode": mode, "batch": batch, "sides": figures}


def _targets(device_result: dict) -> list[dict]:
    out = []
    for row in device_result["rows"]:
        if row["mode"] != "train":
            continue
        dmoe = row["sides"]["dmoe, 1 peer"]
        if row["batch"] >= 512:
            out.append(
                {
                    "name": f"dmoe / in-process, training, batch {row['batch']}",
                    "value": dmoe["vs_limit"],
                    "target": ">= 0.8",
                    "met": (dmoe["vs_limit"] or 0) >= 0.8,
                }
            )
        want = 5.0 if row["batch"] < 512 else 3.0
        if row["batch"] <= 512:
            out.append(
                {
                    "name": f"dmoe / hivemind, training, batch {row['batch']}",
                    "value": dmoe["vs_hivemind"],
                    "target": f">= {want:g}",
                    "met": (dmoe["vs_hivemind"] or 0) >= want,
                }
            )
    return out


SIDE_ORDER = ("in-process", "in-process, same work", "dmoe, 1 peer", "dmoe, 4 peers", "dmoe, 2 peers", "hivemind")


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = [
        "device",
        "mode",
        "batch",
        "side",
        "tokens/s",
        "median s",
        "p10 s",
        "p90 s",
        "n",
        "x in-process",
        "x hivemind",
    ]
    rows = []
    for device, device_result in result["devices"].items():
        for row in device_result["rows"]:
            for name in SIDE_ORDER:
                stats = row["sides"].get(name)
                if stats is None:
                    continue
                rows.append(
                    [
                        device,
                        row["mode"],
                        row["batch"],
                        name,
                        stats["tokens_per_s"],
                        stats["median"],
                        stats["p10"],
                        stats["p90"],
                        stats["n"],
                        stats["vs_limit"],
                        stats["vs_hivemind"],
                    ]
                )
    return headers, rows

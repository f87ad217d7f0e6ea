"""layer: tokens/s of one MoE layer (expert `ffn`, hidden 1024, 16 experts, top-2), training and inference.

Contenders, all in this process run and interleaved round by round:

* ``in-process``: the limit, a top-2 MoE over the same experts in this process (`bench.local_moe`):
  forward that keeps its activations, backward, per-expert clipping and Adam step;
* ``in-process, recompute``: the same in-process experts doing what a peer did before it kept forward graphs
  (and still does when a Backward's graph is gone): a forward without graph, then on backward a recomputed
  forward, its backward and the Adam step; the limit is the better of the two in-process figures;
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
HIVEMIND_SKIPPED = (
    "not run: hivemind's client sends one request per token and expert (8192 per forward at 4096 tokens), takes "
    "minutes per step here, and its DHT process wedged at this size in our runs (beam search never returned)"
)


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
            "hivemind_max_batch": 64,
            "handlers": 4,
        }
    return {
        "hidden": 1024,
        "experts": 16,
        "batches": [64, 512, 4096],
        "multi_peers": 4,
        "reps": {64: 6, 512: 4, 4096: 3},
        "budget": 8.0,
        "hivemind_budget": 15.0,
        "hivemind_max_batch": 512,
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
    return finalize(results)


def finalize(results: dict) -> dict:
    """Ratios and targets from the tokens/s figures. `vs_limit` compares each side with the in-process figures it
    was interleaved with: phase 1 sides with the better of the autograd and the recompute in-process steps (on
    this memory-bound machine the recompute step, which runs each expert's forward and backward back to back
    while its weights are in cache, can be the faster), the phase 2 side with phase 2's in-process step.
    `vs_hivemind` compares with hivemind's figure of the same row."""
    for device_result in results["devices"].values():
        for row in device_result["rows"]:
            candidates = [row["sides"].get(n, {}).get("tokens_per_s") for n in ("in-process", "in-process, recompute")]
            candidates = [c for c in candidates if c is not None and not math.isnan(c)]
            row["limit_tokens_per_s"] = max(candidates) if candidates else math.nan
            phase_2 = row.get("in_process_phase_2", {}).get("tokens_per_s", math.nan)
            hivemind = row["sides"].get("hivemind", {}).get("tokens_per_s")
            for name, stats in row["sides"].items():
                limit = phase_2 if name.startswith("dmoe, ") and name != "dmoe, 1 peer" else row["limit_tokens_per_s"]
                stats["vs_limit"] = ratio(stats["tokens_per_s"], limit)
                stats["vs_hivemind"] = ratio(stats["tokens_per_s"], hivemind)
    results["targets"] = _targets(results["devices"]["cpu"])
    return results


def _run_device(ctx, config: dict, device: str) -> dict:
    """Two phases, so that at most three copies of the 16 experts (with Adam state) are in memory at once:
    (1) in-process, in-process recompute, dmoe on 1 peer and hivemind; (2) in-process and dmoe on N peers.
    Each phase measures the in-process limit again, interleaved with its own contenders."""
    hidden, num_experts, threads = config["hidden"], config["experts"], ctx.threads
    multi = config["multi_peers"]
    torch.set_num_threads(threads)
    per_peer = num_experts // multi
    gate = make_gate(hidden, num_experts)
    local = LocalMoE(gate, make_backends(PREFIX, num_experts, hidden, device=device), K, device=device)
    one = DmoeGroup(
        f"layer-{device}-1", [f"{PREFIX}.[0:{num_experts}]"], hidden_dim=hidden, compute_threads=threads, device=device
    )
    server = HivemindServer(
        {PREFIX: (num_experts, hidden)}, threads=threads, device=device, handlers=config["handlers"]
    )
    many_name = f"dmoe, {multi} peers"
    diffs: dict = {}
    phases: list[list[dict]] = []
    client = None
    try:
        ctx.log(f"layer[{device}]: phase 1: a dmoe peer with {num_experts} experts and a hivemind server")
        start_all(server, one)
        client = HivemindClient(server.initial_peers, call_timeout=30.0 if ctx.quick else 90.0)
        layers = {
            "dmoe, 1 peer": dmoe_layer(
                one.initial_peers, hidden, PREFIX, num_experts, K, gate, timeout_after_k_min=120.0
            ),
            "hivemind": client.layer(hidden, PREFIX, num_experts, K, gate),
        }
        diffs.update(_agreement(local, layers, hidden))
        small = [b for b in config["batches"] if b <= config["hivemind_max_batch"]]
        rows = _measure_all(ctx, config, local, layers, hidden, same_work=True, batches=small)
        # hivemind does not run at the larger batches: stop its server and client first, so that their
        # processes and threads (a timed-out call's among them) take no CPU from the others there
        hivemind_restarts = client.restarts
        client.shutdown()
        client = None
        server.stop()
        layers.pop("hivemind")
        large = [b for b in config["batches"] if b > config["hivemind_max_batch"]]
        rows += _measure_all(ctx, config, local, layers, hidden, same_work=True, batches=large)
        phases.append(sorted(rows, key=lambda row: (row["mode"] != "train", row["batch"])))
    finally:
        if client is not None:
            hivemind_restarts = client.restarts
            client.shutdown()
        stop_all(server, one)
    many = DmoeGroup(
        f"layer-{device}-{multi}",
        [f"{PREFIX}.[{i * per_peer}:{(i + 1) * per_peer}]" for i in range(multi)],
        hidden_dim=hidden,
        compute_threads=max(1, threads // multi),
        device=device,
    )
    try:
        ctx.log(f"layer[{device}]: phase 2: {multi} dmoe peers with {per_peer} experts each")
        many.start()
        layers = {
            many_name: dmoe_layer(many.initial_peers, hidden, PREFIX, num_experts, K, gate, timeout_after_k_min=120.0)
        }
        diffs.update(_agreement(local, layers, hidden, fresh=False))
        phases.append(_measure_all(ctx, config, local, layers, hidden, same_work=False))
    finally:
        many.stop()
    rows = phases[0]
    for row, other in zip(rows, phases[1], strict=True):
        row["sides"][many_name] = other["sides"][many_name]
        row["sides"][many_name]["vs_hivemind"] = ratio(
            other["sides"][many_name]["tokens_per_s"], row["sides"]["hivemind"]["tokens_per_s"]
        )
        row["in_process_phase_2"] = other["sides"]["in-process"]
    return {
        "rows": rows,
        "max_abs_diff": diffs,
        "hivemind_dht_restarts": hivemind_restarts,
        "threads": {
            "client_and_in_process": threads,
            "dmoe_1_peer": threads,
            f"dmoe_{multi}_peers_each": max(1, threads // multi),
            "hivemind_server": threads,
        },
    }


def _measure_all(ctx, config, local, layers, hidden, *, same_work: bool, batches=None) -> list[dict]:
    for layer in layers.values():
        layer.train()
    return [
        _measure(ctx, config, local, layers, mode, batch, hidden, same_work=same_work)
        for mode in ("train", "infer")
        for batch in (config["batches"] if batches is None else batches)
    ]


def _agreement(local: LocalMoE, layers: dict, hidden: int, *, fresh: bool = True) -> dict:
    """Max abs difference of each layer's outputs from in-process ones (before any training when `fresh`;
    afterwards the in-process experts have trained apart from the new peers', so it is not measured)."""
    if not fresh:
        return {name: None for name in layers}
    x = torch.randn(32, hidden)
    with torch.no_grad():
        reference = local.infer(x)
        return {name: float((layer(x) - reference).abs().max()) for name, layer in layers.items()}


def _measure(
    ctx, config, local: LocalMoE, layers: dict, mode: str, batch: int, hidden: int, *, same_work: bool
) -> dict:
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, hidden, generator=generator)
    grad = torch.randn(batch, hidden, generator=generator) / math.sqrt(batch * hidden)
    reps, budget = config["reps"][batch], config["budget"]
    hivemind_skipped = batch > config["hivemind_max_batch"]
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
            )
        ]
        if same_work:
            sides.append(
                Side(
                    "in-process, recompute",
                    lambda: local.train_step(x.clone().requires_grad_(), grad, "recompute"),
                    reps=reps,
                    budget=budget,
                    setup=zero_grads,
                )
            )
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
    if hivemind_skipped:
        sides = [side for side in sides if side.name != "hivemind"]
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
        hivemind = figures.get("hivemind", {}).get("tokens_per_s")
        stats["vs_hivemind"] = ratio(stats["tokens_per_s"], hivemind)
    if hivemind_skipped:
        figures["hivemind"] = {
            **summarize([]),
            "tokens_per_s": math.nan,
            "vs_limit": math.nan,
            "errors": [],
            "skipped": HIVEMIND_SKIPPED,
        }
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
        for name, stats in row["sides"].items():
            if not name.startswith("dmoe, "):
                continue
            if row["batch"] >= 512:
                value = stats["vs_limit"]
                out.append(
                    {
                        "name": f"{name} / in-process limit, training, batch {row['batch']}",
                        "value": value,
                        "target": ">= 0.8",
                        "met": (value or 0) >= 0.8,
                    }
                )
            want = 5.0 if row["batch"] < 512 else 3.0
            if row["batch"] <= 512:
                value = stats["vs_hivemind"]
                out.append(
                    {
                        "name": f"{name} / hivemind, training, batch {row['batch']}",
                        "value": value,
                        "target": f">= {want:g}",
                        "met": (value or 0) >= want,
                    }
                )
    return out


SIDE_ORDER = (
    "in-process",
    "in-process, recompute",
    "dmoe, 1 peer",
    "hivemind",
    "in-process (phase 2)",
    "dmoe, 4 peers",
    "dmoe, 2 peers",
)


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
        "x limit",
        "x hivemind",
    ]
    rows = []
    for device, device_result in result["devices"].items():
        for row in device_result["rows"]:
            sides = dict(row["sides"])
            if "in_process_phase_2" in row:
                phase_2 = dict(row["in_process_phase_2"])
                phase_2["vs_limit"] = 1.0
                phase_2["vs_hivemind"] = None
                sides["in-process (phase 2)"] = phase_2
            for name in SIDE_ORDER:
                stats = sides.get(name)
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

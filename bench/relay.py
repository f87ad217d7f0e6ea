"""relay: p50/p99 latency of a forward and training tokens/s through a libp2p circuit relay, against direct gRPC
on the same network namespaces.

The topology of tests/test_nat.py (`bench.netns`): on one bridge a `dmoe dht` node (every one relays), a client
namespace and a public peer; a home peer behind a NAT router namespace that masquerades and lets no connection in,
run with ``--reachability private``, so it serves over libp2p through the DHT node's relay. Peers in the public
namespace host `direct.[0:4]` (hidden 64) and `direct512.0`, peers in the home namespace `relay.[0:4]` and
`relay512.0`: the same `ffn` experts (`--seed 0`, one compute thread, no replica sync), one peer per hidden size.
From a process in the client namespace (this module with ``--client``), interleaved round by round: a forward of
one expert through `router_client.RemoteExpert` (endpoints from the peers' `--endpoint-file`), and training steps
of a small regression whose middle layer is `RemoteMixtureOfExperts(64, (4,), "relay" or "direct", k_best=2)`
with the router's defaults (a token no expert served fails its step), 64 tokens per step, Adam.
A relay resets a relayed connection after 128 KiB each way (libp2p's limits), so the client opens a new one as
each fills up (counted: "relayed connections"), and a request larger than `RELAYED_MESSAGE_BYTES` cannot be
relayed at all: it fails with RESOURCE_EXHAUSTED at once, so the router uses another replica (shown as "over the
cap"). Skipped, saying why, where network namespaces or iptables are not available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Side, interleave, log, ratio, summarize

PUBLIC, HOME = "10.81.0", "192.168.81"
RELAYED, DIRECT = "relayed (libp2p)", "direct (gRPC)"
PREFIXES = {RELAYED: "relay", DIRECT: "direct"}
NAMESPACES = {RELAYED: "home", DIRECT: "public"}
NUM_EXPERTS = 4
TRAIN_HIDDEN, TRAIN_TOKENS, TRAIN_INPUTS = 64, 64, 8
LATENCY_WARMUP = 3


def _plan(quick: bool) -> dict:
    """What the client measures: (hidden, tokens) of each latency case, repetitions and training steps."""
    if quick:
        return {"latency": [[64, 16]], "latency_reps": 20, "warmup_steps": 2, "train_steps": 8}
    return {"latency": [[64, 16], [512, 16], [512, 32]], "latency_reps": 200, "warmup_steps": 5, "train_steps": 30}


def run(ctx) -> dict:
    """Build the namespaces, start the relay, both peers and the client; return the client's figures."""
    from bench.netns import Topology, build_nat_swarm, nat_unavailable, stop_all

    plan = _plan(ctx.quick)
    config = {
        "experts_per_peer": NUM_EXPERTS,
        "train": {"hidden": TRAIN_HIDDEN, "tokens_per_step": TRAIN_TOKENS, "k_best": 2, "grid": [NUM_EXPERTS]},
        "latency_cases": plan["latency"],
        "latency_reps": plan["latency_reps"],
        "warmup_steps": plan["warmup_steps"],
        "train_steps": plan["train_steps"],
        "relayed_message_bytes": _relayed_message_bytes(),
        "compute_threads": 1,
    }
    reason = nat_unavailable()
    if reason:
        ctx.log(f"relay: skipped: {reason}")
        return _skipped(config, reason)
    topology = Topology(f"dbench{os.getpid()}")
    processes: list = []
    with tempfile.TemporaryDirectory(prefix="dmoe-relay-") as folder:
        workdir = Path(folder)
        try:
            try:
                build_nat_swarm(topology, PUBLIC, HOME)
            except RuntimeError as error:
                ctx.log(f"relay: skipped: {error}")
                return _skipped(config, f"cannot build the namespaces: {error}")
            return {"config": config, **_measure(ctx, topology, workdir, processes, plan)}
        finally:
            stop_all(processes)
            topology.cleanup()


def _skipped(config: dict, reason: str) -> dict:
    """The result of a run that could not measure: says why; the report shows it in place of the figures."""
    return {"config": config, "skipped": reason, "latency": [], "training": {}}


def _measure(ctx, topology, workdir: Path, processes: list, plan: dict) -> dict:
    from bench.netns import Process, peer_argv

    started = time.monotonic()
    dht = Process(
        [*_python(topology, "dht"), "-m", "dmoe_cli", "dht", "--host", f"{PUBLIC}.1", "--port", "0"]
        + ["--addr-file", str(workdir / "dht.addrs")],
        workdir / "dht.log",
    )
    processes.append(dht)
    addrs = dht.wait_for_file(workdir / "dht.addrs", 60).split()
    initial_peer = next(a for a in addrs if a.startswith(f"/ip4/{PUBLIC}.1/"))
    hiddens = sorted({hidden for hidden, _ in plan["latency"]} | {TRAIN_HIDDEN})
    peers = {}  # (side, hidden) -> (process, endpoint file)
    for side, namespace in NAMESPACES.items():
        for hidden in hiddens:
            name = f"{namespace}-{hidden}"
            experts = f"{PREFIXES[side]}.[0:{NUM_EXPERTS}]" if hidden == TRAIN_HIDDEN else f"{PREFIXES[side]}{hidden}.0"
            reach = ["--reachability", "private"] if side == RELAYED else ["--announce-host", f"{PUBLIC}.11"]
            endpoint_file = workdir / f"{name}.json"
            argv = peer_argv(_python(topology, namespace), initial_peer, experts, hidden, endpoint_file, *reach)
            process = Process(argv, workdir / f"{name}.log")
            processes.append(process)
            peers[side, hidden] = (process, workdir / f"{name}.json")
    endpoints: dict[str, dict[str, dict]] = {side: {} for side in NAMESPACES}
    for (side, hidden), (process, path) in peers.items():
        info = json.loads(process.wait_for_file(path, 120))
        uid = f"{PREFIXES[side]}.0" if hidden == TRAIN_HIDDEN else f"{PREFIXES[side]}{hidden}.0"
        endpoints[side][str(hidden)] = {"uid": uid, "endpoint": info["endpoint"], "transport": info.get("transport")}
    for side, expected in ((RELAYED, "relayed"), (DIRECT, "direct")):
        transports = {e["transport"] for e in endpoints[side].values()}
        if transports != {expected}:
            raise RuntimeError(f"the {side} peers announced transports {transports}, not {expected!r}")
    startup_s = time.monotonic() - started
    ctx.log(f"relay: relay and {len(peers)} peers up in {startup_s:.0f} s; measuring from the client namespace")
    client_plan = {**plan, "initial_peers": [initial_peer], "endpoints": endpoints}
    plan_path, result_path = workdir / "plan.json", workdir / "result.json"
    plan_path.write_text(json.dumps(client_plan))
    client = Process(
        [*_python(topology, "client"), "-m", "bench.relay", "--client", str(plan_path), str(result_path)],
        workdir / "client.log",
    )
    processes.append(client)
    try:
        client.proc.wait(120 if ctx.quick else 480)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the client did not finish: {''.join(client.lines)[-3000:]}") from exc
    if client.proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"the client failed ({client.proc.returncode}): {''.join(client.lines)[-3000:]}")
    measured = json.loads(result_path.read_text())
    return {"startup_s": startup_s, "endpoints": endpoints, **measured}


def _python(topology, namespace: str) -> list[str]:
    """`python` in `namespace`, with the benchmarks' child environment (threads, allocator, quiet gRPC)."""
    from bench.common import child_env

    env = child_env(1)
    keys = ("PYTHONUNBUFFERED", "GRPC_VERBOSITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")
    allocator = [key for key in env if key.startswith("MALLOC_")]
    return [
        *topology.exec_prefix(namespace),
        "env",
        *(f"{key}={env[key]}" for key in (*keys, *allocator)),
        sys.executable,
    ]


def _relayed_message_bytes() -> int:
    from router_client.p2p_channel import RELAYED_MESSAGE_BYTES

    return RELAYED_MESSAGE_BYTES


# ---------------------------------------------------------------------------------------------- the client side


def client_main(argv: list[str] | None = None) -> int:
    """`python -m bench.relay --client PLAN RESULT`: measure what PLAN asks for, write RESULT (JSON)."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--client", nargs=2, metavar=("PLAN", "RESULT"), required=True)
    args = parser.parse_args(argv)
    plan_path, result_path = args.client
    import torch

    from bench.common import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    plan = json.loads(Path(plan_path).read_text())
    result = _client_measure(plan)
    Path(result_path + ".tmp").write_text(json.dumps(result))
    os.replace(result_path + ".tmp", result_path)
    return 0


def _client_measure(plan: dict) -> dict:
    from router_client import RouterConfig
    from router_client.swarm_client import get_context

    transport = get_context(RouterConfig()).transport  # the one a default RemoteExpert / layer calls through
    latency = []
    for hidden, tokens in plan["latency"]:
        before = _connections(transport)
        latency.append(_latency_case(plan, hidden, tokens, transport))
        latency[-1]["relayed_connections"] = _connections(transport) - before
        log(
            f"relay client: hidden {hidden}, {tokens} tokens: "
            + ", ".join(f"{name} p50 {_ms(s['median'])}" for name, s in latency[-1]["sides"].items())
        )
    before = _connections(transport)
    training = _training(plan)
    training["relayed_connections"] = _connections(transport) - before
    log(
        "relay client: training "
        + ", ".join(f"{name} {s['tokens_per_s']:.0f} tokens/s" for name, s in training["sides"].items())
    )
    return {
        "latency": latency,
        "training": training,
        "relayed_connections_total": _connections(transport),
        "loadavg_end": list(os.getloadavg()),
    }


def _connections(transport) -> int:
    """Relayed connections the client's transport has opened so far, over every libp2p endpoint."""
    return sum(channel.connections for channel in transport.p2p._channels.values())


def _latency_case(plan: dict, hidden: int, tokens: int, transport) -> dict:
    """One forward of one expert on each side, interleaved; relayed calls split by whether they opened a
    new relayed connection (the one before was used up) or reused one."""
    import torch

    from router_client import RemoteExpert

    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(hidden + tokens))
    sides, opened = [], []  # opened: per successful relayed call, whether it opened a connection
    for name in (RELAYED, DIRECT):
        target = plan["endpoints"][name][str(hidden)]
        expert = RemoteExpert(target["uid"], target["endpoint"])

        def forward(expert=expert, relayed=name == RELAYED) -> None:
            before = _connections(transport)
            with torch.no_grad():
                expert(x)
            if relayed:
                opened.append(_connections(transport) > before)

        sides.append(
            Side(name, forward, reps=plan["latency_reps"], warmup=LATENCY_WARMUP, min_reps=plan["latency_reps"])
        )
    interleave(sides)
    relayed = sides[0].samples
    timed_opened = opened[len(opened) - len(relayed) :]  # the warm-up calls came first
    return {
        "hidden": hidden,
        "tokens": tokens,
        "request_bytes": tokens * hidden * 4,
        "sides": {s.name: {**summarize(s.samples), "errors": s.errors[:2]} for s in sides},
        "relayed_new_connection": summarize([t for t, new in zip(relayed, timed_opened, strict=True) if new]),
        "relayed_reused_connection": summarize([t for t, new in zip(relayed, timed_opened, strict=True) if not new]),
    }


def _training(plan: dict) -> dict:
    import torch
    from torch import nn

    from router_client import RemoteMixtureOfExperts

    w_true = torch.randn(TRAIN_INPUTS, 1, generator=torch.Generator().manual_seed(1))
    sides, losses, layers = [], {}, {}
    for name in (RELAYED, DIRECT):
        torch.manual_seed(0)
        layer = RemoteMixtureOfExperts(
            TRAIN_HIDDEN, (NUM_EXPERTS,), PREFIXES[name], k_best=2, initial_peers=plan["initial_peers"]
        )
        model = nn.Sequential(nn.Linear(TRAIN_INPUTS, TRAIN_HIDDEN), layer, nn.Linear(TRAIN_HIDDEN, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        data = torch.Generator().manual_seed(2)  # both sides see the same batches
        losses[name], layers[name] = [], layer

        def step(model=model, optimizer=optimizer, layer=layer, data=data, trace=losses[name]) -> None:
            x = torch.randn(TRAIN_TOKENS, TRAIN_INPUTS, generator=data)
            loss = nn.functional.mse_loss(model(x), torch.sin(x @ w_true)) + 0.01 * layer.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.append(loss.item())

        sides.append(
            Side(name, step, reps=plan["train_steps"], warmup=plan["warmup_steps"], min_reps=plan["train_steps"])
        )
    interleave(sides)
    out = {}
    for side in sides:
        stats = summarize(side.samples)
        trace = losses[side.name]
        out[side.name] = {
            "step_s": stats,
            "tokens_per_s": TRAIN_TOKENS / stats["median"] if side.samples else math.nan,
            "loss_first": sum(trace[:3]) / 3 if len(trace) >= 3 else math.nan,
            "loss_last": sum(trace[-3:]) / 3 if len(trace) >= 3 else math.nan,
            "masked_tokens": layers[side.name].stats["masked_tokens"],
            "errors": side.errors[:2],
        }
    return {"tokens_per_step": TRAIN_TOKENS, "hidden": TRAIN_HIDDEN, "sides": out}


def _ms(seconds: float) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


# ---------------------------------------------------------------------------------------------- the report


def _cap_text(result: dict) -> str:
    return f"over the cap ({result['config']['relayed_message_bytes'] / 1024:.0f} KiB)"


def table(result: dict) -> tuple[list[str], list[list]]:
    """One row per figure: relayed and direct side by side, their ratio, and the relayed connections it took."""
    headers = ["figure", RELAYED, DIRECT, "relayed / direct", "relayed connections"]
    if result.get("skipped"):
        return headers, [[f"skipped: {result['skipped']}", None, None, None, None]]
    rows = []
    for case in result["latency"]:
        relayed, direct = case["sides"][RELAYED], case["sides"][DIRECT]
        label = f"hidden {case['hidden']}, {case['tokens']} tokens ({case['request_bytes'] / 1024:.0f} KiB)"
        over = not relayed["n"] and case["request_bytes"] > result["config"]["relayed_message_bytes"]
        for stat in ("median", "p99"):
            relayed_cell = _cap_text(result) if over else _milli(relayed[stat])
            rows.append(
                [
                    f"forward {'p50' if stat == 'median' else stat} ms, {label}",
                    relayed_cell,
                    _milli(direct[stat]),
                    None if over else ratio(relayed[stat], direct[stat]),
                    case["relayed_connections"] if stat == "median" else "",
                ]
            )
    training = result["training"]
    sides = training["sides"]
    rows.append(
        [
            f"training tokens/s, hidden {training['hidden']}, {training['tokens_per_step']} tokens per step",
            sides[RELAYED]["tokens_per_s"],
            sides[DIRECT]["tokens_per_s"],
            ratio(sides[RELAYED]["tokens_per_s"], sides[DIRECT]["tokens_per_s"]),
            training["relayed_connections"],
        ]
    )
    rows.append(
        [
            "training step p90 ms",
            _milli(sides[RELAYED]["step_s"]["p90"]),
            _milli(sides[DIRECT]["step_s"]["p90"]),
            ratio(sides[RELAYED]["step_s"]["p90"], sides[DIRECT]["step_s"]["p90"]),
            "",
        ]
    )
    return headers, rows


def _milli(seconds):
    return None if seconds is None else seconds * 1e3


def extra(result: dict) -> str:
    """The line under the table: what the relayed path costs against direct gRPC, with the numbers."""
    if result.get("skipped"):
        return f"Not measured on this machine: {result['skipped']}."
    parts = []
    for case in result["latency"]:
        relayed, direct = case["sides"][RELAYED], case["sides"][DIRECT]
        label = f"hidden {case['hidden']} x {case['tokens']} tokens"
        if not relayed["n"]:
            error = (relayed["errors"] or ["no answer"])[0]
            error = next(iter(re.findall(r"[A-Z][A-Z_]{3,}: .*", error)), error)  # the status, not the address
            parts.append(f"{label} ({case['request_bytes'] / 1024:.0f} KiB) cannot be relayed ({error[:120]})")
            continue
        parts.append(
            f"{label}: p50 {_num(relayed['median'] * 1e3)} ms relayed against {_num(direct['median'] * 1e3)} ms "
            f"direct (+{_num((relayed['median'] - direct['median']) * 1e3)} ms, "
            f"{_num(ratio(relayed['median'], direct['median']))}x), "
            f"{case['relayed_connections']} relayed connections for {relayed['n'] + LATENCY_WARMUP} calls"
            + _split(case)
        )
    sides = result["training"]["sides"]
    relayed, direct = sides[RELAYED], sides[DIRECT]
    steps = result["config"]["train_steps"] + result["config"]["warmup_steps"]
    parts.append(
        f"training: {_num(relayed['tokens_per_s'])} tokens/s relayed against {_num(direct['tokens_per_s'])} direct "
        f"({_num(ratio(relayed['tokens_per_s'], direct['tokens_per_s']))}x), "
        f"{result['training']['relayed_connections']} relayed connections in {steps} steps; loss "
        f"{_num(relayed['loss_first'])} → {_num(relayed['loss_last'])} relayed, "
        f"{_num(direct['loss_first'])} → {_num(direct['loss_last'])} direct"
    )
    errors = [f"{name}: {s['errors'][0]}" for name, s in sides.items() if s["errors"]]
    if errors:
        parts.append("failed steps: " + "; ".join(errors))
    return (
        "What the relay costs: "
        + "; ".join(parts)
        + f". The relay and the peers served {_num(result['startup_s'])} s after their start; load average at the end "
        + ", ".join(f"{x:.2f}" for x in result.get("loadavg_end", []))
        + "."
    )


def _split(case: dict) -> str:
    """ " (p50 … ms on the calls that opened a new relayed connection, … ms on the others)", when both happened."""
    new, reused = case.get("relayed_new_connection", {}), case.get("relayed_reused_connection", {})
    if not new.get("n") or not reused.get("n"):
        return ""
    return (
        f" (p50 {_num(new['median'] * 1e3)} ms on the {new['n']} timed calls that opened one, "
        f"{_num(reused['median'] * 1e3)} ms on the {reused['n']} others)"
    )


def _num(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


if __name__ == "__main__":
    sys.exit(client_main())

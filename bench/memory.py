"""memory: peak RSS of a peer per hosted expert, against its experts' parameter and optimizer bytes; client RSS.

Peers hosting 1, 4 and 16 `ffn` experts of hidden 1024 (Adam) are started as processes with the default
allocator (as shipped); every expert then gets two training steps of 512 tokens (so its gradients and Adam
state exist) and two forwards. Measured from /proc: the peer process's peak RSS (VmHWM) and current RSS, and
the RSS of its DHT child processes (hivemind's DHT and its libp2p daemon). The base is a peer hosting one
expert of hidden 64 (the interpreter, torch, gRPC: fixed costs). The client is a separate process that imports
the router, builds `RemoteMixtureOfExperts` over the 16-expert peer and trains it for 3 steps of 512 tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.common import REPO, child_env, memory_kb
from bench.servers import DmoeGroup, stop_all

MIB = 1 << 20

CLIENT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    def rss():
        status = Path("/proc/self/status").read_text().splitlines()
        return {l.split(":")[0]: int(l.split()[1]) for l in status if l.startswith(("VmRSS", "VmHWM"))}
    torch.set_num_threads(1)
    figures = {"after_import_torch": rss()}
    from router_client import RemoteMixtureOfExperts
    figures["after_import_router"] = rss()
    hidden, experts, initial_peers = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    layer = RemoteMixtureOfExperts(hidden, (experts,), "ffn", 2, initial_peers=initial_peers,
                                   forward_timeout=120, backward_timeout=120)
    figures["after_layer"] = rss()
    for step in range(3):
        x = torch.randn(512, hidden, requires_grad=True)
        layer(x).pow(2).mean().backward()
    figures["after_training"] = rss()
    print("CLIENT " + json.dumps(figures), flush=True)
""")


def _tree_rss_kb(pid: int) -> int:
    """RSS of the descendants of `pid` (not `pid` itself), in KiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        total += memory_kb(child).get("VmRSS", 0)
        todo += children.get(child, [])
    return total


def _exercise(endpoint: str, uids: list[str], hidden: int) -> None:
    import torch

    from router_client import RemoteExpert

    for uid in uids:
        expert = RemoteExpert(uid, endpoint, forward_timeout=120, backward_timeout=120)
        for _ in range(2):
            x = torch.randn(512, hidden, requires_grad=True)
            expert(x).pow(2).mean().backward()
        with torch.no_grad():
            expert(torch.randn(512, hidden))


def run(ctx) -> dict:
    import torch

    from peer import get_expert_class

    torch.set_num_threads(1)
    hidden = 64 if ctx.quick else 1024
    counts = [1, 2] if ctx.quick else [1, 4, 16]
    module = get_expert_class("ffn").module_cls(hidden)
    params_per_expert = sum(p.numel() for p in module.parameters())
    param_bytes, adam_bytes = 4 * params_per_expert, 8 * params_per_expert
    groups = {
        n: DmoeGroup(f"memory-{n}", [f"ffn.[0:{n}]"], hidden_dim=hidden, compute_threads=1, tuned_allocator=False)
        for n in counts
    }
    # quick mode hosts hidden-64 experts anyway: its 1-expert peer is the base
    base = (
        None
        if ctx.quick
        else DmoeGroup("memory-base", ["ffn.[0:1]"], hidden_dim=64, compute_threads=1, tuned_allocator=False)
    )
    rows, client = [], {}
    try:
        todo = ([(base, 1)] if base is not None else []) + [(g, n) for n, g in groups.items()]
        for group, n in todo:  # one at a time, so that they do not disturb each other
            group.start()
            group_hidden = group.hidden_dim
            _exercise(group.endpoints[0], [f"ffn.{i}" for i in range(n)], group_hidden)
            figures = memory_kb(group.pids[0])
            row = {
                "experts": n,
                "hidden": group_hidden,
                "peak_rss_mib": figures.get("VmHWM", 0) / 1024,
                "rss_mib": figures.get("VmRSS", 0) / 1024,
                "dht_children_rss_mib": _tree_rss_kb(group.pids[0]) / 1024,
            }
            if group is base or (base is None and n == counts[0]):
                base_row = dict(row)
            if group is not base:
                row["param_mib"] = n * param_bytes / MIB
                row["param_and_adam_mib"] = n * (param_bytes + adam_bytes) / MIB
                rows.append(row)
            ctx.log(f"memory: peer with {n} experts of hidden {group_hidden}: peak RSS {row['peak_rss_mib']:.0f} MiB")
            if group is not groups[counts[-1]]:
                group.stop()
        big = groups[counts[-1]]
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT, str(hidden), str(counts[-1]), *big.initial_peers],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=child_env(1, tuned_allocator=False),
            timeout=600,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("CLIENT ")), None)
        if line is None:
            raise RuntimeError(f"the client process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        client = {
            k: {"rss_mib": v.get("VmRSS", 0) / 1024, "peak_rss_mib": v.get("VmHWM", 0) / 1024}
            for k, v in json.loads(line[len("CLIENT ") :]).items()
        }
        ctx.log(f"memory: client peak RSS {client['after_training']['peak_rss_mib']:.0f} MiB")
    finally:
        stop_all(*([base] if base else []), *groups.values())

    # per-expert cost: the slope between the smallest and the largest peer
    first, last = rows[0], rows[-1]
    slope = (last["peak_rss_mib"] - first["peak_rss_mib"]) / (last["experts"] - first["experts"])
    per_expert = (param_bytes + adam_bytes) / MIB
    for row in rows:
        row["budget_mib"] = 1.5 * row["param_and_adam_mib"] + base_row["peak_rss_mib"]
        row["over_base_vs_param_and_adam"] = (row["peak_rss_mib"] - base_row["peak_rss_mib"]) / row[
            "param_and_adam_mib"
        ]
    largest = rows[-1]
    return {
        "config": {
            "hidden": hidden,
            "expert_counts": counts,
            "params_per_expert": params_per_expert,
            "param_and_adam_mib_per_expert": per_expert,
            "allocator": "glibc default",
        },
        "base": base_row,
        "rows": rows,
        "client": client,
        "slope_mib_per_expert": slope,
        "slope_vs_param_and_adam": slope / per_expert,
        "targets": [
            {
                "name": f"peer peak RSS with {largest['experts']} experts <= 1.5 x param+Adam + base "
                f"({base_row['peak_rss_mib']:.0f} MiB)",
                "value": largest["peak_rss_mib"] / largest["budget_mib"],
                "target": "<= 1.0 (ratio to the budget)",
                "met": largest["peak_rss_mib"] <= largest["budget_mib"],
            }
        ],
    }


def table(result: dict) -> tuple[list[str], list[list]]:
    headers = [
        "experts",
        "hidden",
        "param+Adam MiB",
        "peak RSS MiB",
        "RSS MiB",
        "(peak - base) / (param+Adam)",
        "budget MiB",
        "DHT children MiB",
    ]
    base = result["base"]
    rows = [
        ["base", base["hidden"], 0.0, base["peak_rss_mib"], base["rss_mib"], None, None, base["dht_children_rss_mib"]]
    ]
    rows += [
        [
            r["experts"],
            r["hidden"],
            r["param_and_adam_mib"],
            r["peak_rss_mib"],
            r["rss_mib"],
            r["over_base_vs_param_and_adam"],
            r["budget_mib"],
            r["dht_children_rss_mib"],
        ]
        for r in result["rows"]
    ]
    for name, figures in result["client"].items():
        rows.append([f"client {name}", None, None, figures["peak_rss_mib"], figures["rss_mib"], None, None, None])
    return headers, rows

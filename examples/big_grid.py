"""Train a RemoteMixtureOfExperts over a big expert grid and print how long its steps take.

    dmoe dht --addr-file dht.txt &
    dmoe peer --initial-peers $(head -1 dht.txt) --experts 'ffn.[0:32].[0:64]' --hidden-dim 16 &
    dmoe peer --initial-peers $(head -1 dht.txt) --experts 'ffn.[32:64].[0:64]' --hidden-dim 16 &
    python examples/big_grid.py --initial-peers $(head -1 dht.txt) --grid 64 64 --steps 50

The router beam-searches the grid's DHT records (one round trip per grid level on the first step, none after)
instead of listing its experts. Prints one JSON line per step (step, loss, seconds) with --json, and always a
JSON summary last: the first step's seconds (the client's cold start: DHT lookups included), how long building
the layer and the example's optimizer took before it, the median step, the first and last losses, and the DHT
lookups the router waited for or ran in the background.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from router_client import RemoteMixtureOfExperts


def main() -> None:
    """Train for --steps steps and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--grid", type=int, nargs="+", default=[64, 64], help="grid size per dimension")
    parser.add_argument("--prefix", default="ffn")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step")
    parser.add_argument("--hidden-dim", type=int, default=16)
    parser.add_argument("--k", type=int, default=2, help="experts per token")
    parser.add_argument("--forward-timeout", type=float, default=5.0, help="the router's forward deadline, seconds")
    parser.add_argument("--json", action="store_true", help="print each step as a JSON line")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process (0: torch's choice); the model is tiny, and more threads would only "
        "spin on the cores the peers need",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.monotonic()
    moe = RemoteMixtureOfExperts(
        args.hidden_dim,
        tuple(args.grid),
        args.prefix,
        args.k,
        initial_peers=args.initial_peers,
        forward_timeout=args.forward_timeout,
        backward_timeout=args.forward_timeout,
    )
    moe_ready = time.monotonic()
    model = nn.Sequential(nn.Linear(8, args.hidden_dim), moe, nn.Linear(args.hidden_dim, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # the first optimizer of a process imports torch._dynamo
    optimizer_seconds = time.monotonic() - moe_ready
    w_true = torch.randn(8, 1)
    steps, losses = [], []
    for step in range(args.steps):
        began = time.monotonic()
        x = torch.randn(args.tokens, 8)
        loss = nn.functional.mse_loss(model(x), x @ w_true)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append(time.monotonic() - began)
        losses.append(loss.item())
        if args.json:
            print(json.dumps({"step": step, "loss": round(losses[-1], 5), "seconds": round(steps[-1], 4)}), flush=True)
    print(
        json.dumps(
            {
                "grid": args.grid,
                "experts": int(torch.tensor(args.grid).prod()),
                "client_start_to_first_step_end_s": round(time.monotonic() - started - sum(steps[1:]), 3),
                "moe_init_s": round(moe_ready - started, 3),
                "optimizer_init_s": round(optimizer_seconds, 3),
                "first_step_s": round(steps[0], 3),
                "median_step_s": round(statistics.median(steps[1:]), 4),
                "first_loss": round(losses[0], 4),
                "last_loss": round(statistics.mean(losses[-5:]), 4),
                "dht_lookups": dict(moe.index.lookups),
                "experts_known": moe.index.num_known,
                "router": {key: int(value) for key, value in moe.stats.items()},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

"""A training client for the multi-host tests: one JSON line per step, saying which peers served it.

    python tests/swarm_driver.py --initial-peers MADDR --num-experts 4 --hidden-dim 32 --stop-file STOP

Trains a small regression model whose middle layer is a `RemoteMixtureOfExperts` until STOP exists (or
--max-steps), printing after each step: {"step", "ok", "seconds", "loss", "served": {endpoint: successful
calls this step}, "masked": tokens short of answers this step, "error"}. The calls are real; the driver only
counts, per endpoint, the calls that came back with an answer (by wrapping the router's transport).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
from torch import nn

from router_client import RemoteMixtureOfExperts


def main() -> int:
    """Train until the stop file appears; exit code 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per step")
    parser.add_argument("--timeout", type=float, default=2.0, help="forward and backward timeout")
    parser.add_argument("--stop-file", default=None)
    parser.add_argument("--max-steps", type=int, default=100_000)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    moe = RemoteMixtureOfExperts(
        args.hidden_dim,
        (args.num_experts,),
        "ffn",
        k_best=2,
        initial_peers=args.initial_peers,
        forward_timeout=args.timeout,
        backward_timeout=args.timeout,
        allow_zero_outputs=True,
    )
    served: collections.Counter = collections.Counter()
    record_success = moe.scores.record_success

    def counting_success(endpoint, latency):  # every answered call, whichever way the transport sent it
        served[endpoint] += 1
        record_success(endpoint, latency)

    moe.scores.record_success = counting_success
    model = nn.Sequential(nn.Linear(8, args.hidden_dim), moe, nn.Linear(args.hidden_dim, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    w_true = torch.randn(8, 1)
    for step in range(args.max_steps):
        if args.stop_file and os.path.exists(args.stop_file):
            break
        served.clear()
        masked_before = moe.stats["masked_tokens"]
        started = time.monotonic()
        record = {"step": step, "ok": True, "error": None, "loss": None}
        try:
            x = torch.randn(args.tokens, 8)
            loss = nn.functional.mse_loss(model(x), torch.sin(x @ w_true)) + 0.01 * moe.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            record["loss"] = loss.item()
        except Exception as error:  # a failed step is reported, and training goes on
            record.update(ok=False, error=repr(error)[:500])
        record.update(
            seconds=round(time.monotonic() - started, 4),
            served=dict(served),
            masked=moe.stats["masked_tokens"] - masked_before,
            time=time.time(),
        )
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

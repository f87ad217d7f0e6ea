"""Train a tiny regression model whose middle layer is a RemoteMixtureOfExperts, over a running swarm.

    dmoe swarm --peers 4 --experts-per-peer 2 --replicas 2 --hidden-dim 64 --addr-file dht.txt &
    python examples/train_over_swarm.py --initial-peers $(head -1 dht.txt) --steps 50

Prints one line per step with its loss and duration; kill a peer meanwhile and watch training go on.
With --json each step line is a JSON record instead: {"step", "loss", "seconds", "masked_tokens"} (tokens that
got fewer than k expert answers so far; null loss for a failed step). The last line is always a JSON summary of
the run: steps, failed steps, tokens, steps/s, the router's counters. The router runs with its defaults (strict:
a token left without any answer fails the step, which is counted and skipped); --seconds trains for a duration.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from router_client import RemoteExpertError, RemoteMixtureOfExperts


def main() -> None:
    """Train for --steps steps (or --seconds) and print a JSON summary at the end."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=0.0, help="train this long instead of --steps steps")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step")
    parser.add_argument("--allow-zero-outputs", action="store_true", help="zeros for tokens no expert answered")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--forward-timeout", type=float, default=3.0)
    parser.add_argument("--backward-timeout", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print each step as a JSON record")
    args = parser.parse_args()

    torch.manual_seed(0)
    moe = RemoteMixtureOfExperts(
        args.hidden_dim,
        (args.num_experts,),
        "ffn",
        k_best=2,
        initial_peers=args.initial_peers,
        forward_timeout=args.forward_timeout,
        backward_timeout=args.backward_timeout,
        allow_zero_outputs=args.allow_zero_outputs,
    )
    model = nn.Sequential(nn.Linear(8, args.hidden_dim), moe, nn.Linear(args.hidden_dim, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    w_true = torch.randn(8, 1)
    step_times, losses, failures = [], [], []
    began = time.monotonic()
    step = 0
    while (time.monotonic() - began < args.seconds) if args.seconds > 0 else step < args.steps:
        started = time.monotonic()
        x = torch.randn(args.tokens, 8)
        try:
            loss = nn.functional.mse_loss(model(x), torch.sin(x @ w_true)) + 0.01 * moe.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        except RemoteExpertError as error:  # no expert answered some token: this step is lost, training goes on
            failures.append(str(error)[:300])
            losses.append(None)
        step_times.append(time.monotonic() - started)
        if args.json:
            record = {
                "step": step,
                "loss": losses[-1],
                "seconds": step_times[-1],
                "masked_tokens": moe.stats.get("masked_tokens", 0),
            }
            print(json.dumps(record), flush=True)
        elif losses[-1] is None:
            print(f"step {step:3d} FAILED: {failures[-1]}", flush=True)
        else:
            print(f"step {step:3d} loss {losses[-1]:.4f} took {step_times[-1]:.3f} s", flush=True)
        step += 1
    done = [loss for loss in losses if loss is not None]
    summary = {
        "steps": step,
        "failed_steps": len(failures),
        "first_failure": failures[0] if failures else None,
        "tokens": step * args.tokens,
        "seconds": time.monotonic() - began,
        "steps_per_second": step / max(time.monotonic() - began, 1e-9),
        "first_loss": done[0] if done else None,
        "last_loss": done[-1] if done else None,
        "max_step_seconds": max(step_times, default=0.0),
        "step_limit_seconds": args.forward_timeout + args.backward_timeout,
        "stats": dict(moe.stats),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

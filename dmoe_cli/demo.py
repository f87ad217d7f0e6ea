"""`dmoe demo`: the main job. A local swarm, the reference model trained over it, a few sampled lines."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dmoe_cli.config_args import add_config_arguments, config_from_args, nested_config
from dmoe_cli.config_args import config_field as _opt
from dmoe_cli.logs import setup_logging
from dmoe_cli.training import InferConfig, TrainConfig, infer, train

# What the demo sets on its training job itself, from the swarm it starts: no flags of `dmoe demo`.
DEMO_SETS = ("initial_peers", "checkpoint", "resume", "sample_chars", "n_embd", "grid_size", "uid_prefix", "ffn")


@dataclass
class DemoConfig:
    """What the demo runs: the swarm's shape and the training over it. Defaults finish in minutes on 2 cores.

    `train` is the training job (`dmoe train`'s flags, but for those in `DEMO_SETS`): the demo trains longer by
    default, evaluates and saves every 100 steps, and gives the client one torch thread (the peers get the
    other cores). The model's width is `hidden_dim`, its expert grid the swarm's experts.
    """

    peers: int = _opt(4, "peer processes in the local swarm")
    experts_per_peer: int = _opt(4, "experts hosted by each peer")
    replicas: int = _opt(2, "peers hosting each expert (so one peer can die without losing an expert)")
    hidden_dim: int = _opt(64, "width of the model and of every expert")
    samples: int = _opt(3, "lines of text to sample at the end")
    workdir: str | None = _opt(None, "where the client checkpoint and logs go (default: a temporary directory)")
    chaos: bool = _opt(
        False,
        "chaos: SIGKILL a random peer every --chaos-kill-every seconds while training, and restart it "
        "from its checkpoints",
    )
    chaos_kill_every: float = _opt(10.0, "seconds between two kills in --chaos mode", metavar="SECONDS")
    train: TrainConfig = nested_config(
        TrainConfig, hidden=DEMO_SETS, steps=600, eval_every=100, save_every=100, threads=1
    )


def run_demo(config: DemoConfig, *, verbose: bool = False) -> int:
    """Start a swarm, train over it, sample, and shut everything down; 0 when the loss fell.

    With `chaos`, peers are SIGKILLed and restarted while training (see `dmoe_cli.chaos`); then 0 also needs
    every restarted peer to have resumed its experts' checkpointed update counts.
    """
    from dmoe_cli.chaos import Chaos, prepare_chaos
    from dmoe_cli.swarm import LocalSwarm, SwarmConfig

    if config.train.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {config.train.steps}")
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="dmoe-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    swarm_config = SwarmConfig(
        peers=config.peers,
        experts_per_peer=config.experts_per_peer,
        replicas=config.replicas,
        hidden_dim=config.hidden_dim,
        log_dir=str(workdir / "logs"),
        extra_peer_args=["--compute-threads", "1", "--lr", "3e-3"],
    )
    if config.chaos:
        swarm_config.chaos_kill_every, swarm_config.chaos_restart = config.chaos_kill_every, True
        swarm_config.checkpoint_dir = str(workdir / "checkpoints")
        chaos_line = prepare_chaos(swarm_config, workdir)
    started = time.monotonic()
    print(f"== dmoe demo: starting a local swarm of {config.peers} peers (logs in {workdir / 'logs'})", flush=True)
    with LocalSwarm(swarm_config, verbose=verbose) as swarm:
        num_experts = len(swarm.uids)
        print(
            f"== {num_experts} experts ffn.0 … ffn.{num_experts - 1}, each on {config.replicas} peers; "
            f"ready in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        print(
            f"== training a byte-level transformer on the Python standard library for {config.train.steps} steps",
            flush=True,
        )
        chaos = None
        if config.chaos:
            print(f"== {chaos_line}", flush=True)
            chaos = Chaos(
                swarm, config.chaos_kill_every, restart=True, on_event=lambda e: print("   " + e.describe(), flush=True)
            )
        train_config = dataclasses.replace(
            config.train,
            initial_peers=swarm.initial_peers,
            checkpoint=str(workdir / "client.pt"),
            resume=False,
            sample_chars=0,
            model=dataclasses.replace(config.train.model, n_embd=config.hidden_dim, grid_size=(num_experts,)),
        )
        if chaos is None:
            summary = train(train_config, progress=True)
        else:
            with chaos:  # the progress bar would garble the chaos events: no bar
                summary = train(train_config, progress=False)
            chaos.join(60.0)
        print(
            f"== loss {summary['initial_loss']:.3f} → {summary['final_loss']:.3f} in {summary['steps']} steps, "
            f"{summary['tokens_per_second']:.0f} tokens/s; expert calls: {_describe(summary.get('expert_stats', {}))}",
            flush=True,
        )
        if chaos is not None:
            print(f"== {chaos.summary()}; {summary['failed_steps']} failed training steps", flush=True)
        print("== samples (prompt 'def '):", flush=True)
        for index in range(config.samples):
            text = infer(
                InferConfig(
                    checkpoint=str(workdir / "client.pt"),
                    prompt="def ",
                    max_new_tokens=120,
                    seed=index,
                    initial_peers=swarm.initial_peers,
                    router=train_config.router,
                )
            )
            line = ("def " + text).splitlines()[0] if text else "def "
            print(f"   {line[:100]}", flush=True)
    print(f"== done in {time.monotonic() - started:.0f} s; the swarm is stopped", flush=True)
    resumed_ok = chaos is None or not chaos.mismatches()
    return 0 if summary["final_loss"] < summary["initial_loss"] and resumed_ok else 1


def _describe(stats: dict) -> str:
    keys = ("expert_requests", "failed_requests", "masked_tokens", "backward_failures")
    return ", ".join(f"{key.replace('_', ' ')} {int(stats.get(key, 0))}" for key in keys)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """`dmoe demo` flags (one per DemoConfig field)."""
    add_config_arguments(parser, DemoConfig)


def run_demo_command(args: argparse.Namespace) -> int:
    """Entry point of `dmoe demo`."""
    setup_logging(args.verbose)
    return run_demo(config_from_args(DemoConfig, args), verbose=args.verbose)


__all__ = ["DemoConfig", "add_demo_arguments", "run_demo", "run_demo_command"]

"""The subcommands of `dmoe`: name -> (help, add_arguments(parser), run(args) -> exit code)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable

from dmoe_cli.config_args import add_config_arguments, add_required_initial_peers, config_from_args
from dmoe_cli.logs import setup_logging


def run_async(coro) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _add_dht_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.configs import DHTConfig

    add_config_arguments(parser, DHTConfig)


def _run_dht(args: argparse.Namespace) -> int:
    from dht import DHTNode

    setup_logging(args.verbose)
    node = DHTNode(
        initial_peers=args.initial_peers,
        host=args.host,
        port=args.port,
        announce_host=args.announce_host,
        identity_path=args.identity,
    )
    try:
        maddrs = node.visible_maddrs()
        if args.addr_file:  # written atomically: a reader that sees the file sees every line
            from peer import atomic_write_bytes  # imported after the DHT process is forked, like in a peer

            atomic_write_bytes(args.addr_file, "".join(f"{m}\n" for m in maddrs).encode())
        print("DHT node running. Join it with:", flush=True)
        for maddr in maddrs:
            print(f"  --initial-peers {maddr}", flush=True)
        _wait_for_signal(node.is_alive)
    finally:
        node.shutdown()
    return 0


def _add_peer_args(parser: argparse.ArgumentParser) -> None:
    from peer import PeerConfig

    add_config_arguments(parser, PeerConfig)


def _run_peer(args: argparse.Namespace) -> int:
    from peer import PeerConfig, run_peer

    setup_logging(args.verbose)
    config = config_from_args(PeerConfig, args)

    def on_ready(peer) -> None:
        print(
            f"peer serving {len(peer.uids)} experts ({peer.uids[0]} … {peer.uids[-1]}) at {peer.endpoint}", flush=True
        )
        if peer.dht_node is not None:
            print(f"peer DHT node: {peer.dht_node.visible_maddrs()[0]}", flush=True)

    run_async(run_peer(config, on_ready=on_ready))
    return 0


def _add_status_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.configs import StatusConfig

    add_config_arguments(parser, StatusConfig, skip=("initial_peers",))
    add_required_initial_peers(parser, "ask")
    from dmoe_cli.status import add_all_flag

    add_all_flag(parser)


def _run_status(args: argparse.Namespace) -> int:
    from hivemind.utils import get_dht_time

    from dht import DHTNode, ExpertDirectory
    from dmoe_cli.status import print_json, print_status, status_document

    setup_logging(args.verbose)
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    with DHTNode(initial_peers=args.initial_peers, client_mode=True, call_timeout=args.timeout) as node:
        experts = ExpertDirectory(node).list_experts(args.prefix, timeout=args.timeout)
    document = status_document(args.prefix, experts, get_dht_time())
    if args.json:
        print_json(document)
        return 0
    if not experts:
        print(f"no experts found under prefix {args.prefix!r}")
        return 1
    print_status(document, show_all=args.all)
    return 0


def _wait_for_signal(alive: Callable[[], bool] = lambda: True) -> None:
    """Block until SIGINT/SIGTERM (or until `alive()` turns false)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not alive():
            print("the DHT process died", file=sys.stderr)
            time.sleep(0.1)
            break


def _jobs():
    from dmoe_cli import jobs

    return jobs


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    _jobs().add_train_arguments(parser)


def _add_infer_args(parser: argparse.ArgumentParser) -> None:
    _jobs().add_infer_arguments(parser)


def _add_swarm_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.swarm_command import add_swarm_arguments

    add_swarm_arguments(parser)


def _run_swarm(args: argparse.Namespace) -> int:
    from dmoe_cli.swarm_command import run_swarm_command

    return run_swarm_command(args)


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.demo import add_demo_arguments

    add_demo_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from dmoe_cli.demo import run_demo_command

    return run_demo_command(args)


def _add_bench_args(parser: argparse.ArgumentParser) -> None:
    from bench.cli import add_bench_arguments

    add_bench_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from bench.cli import run_bench_command

    return run_bench_command(args)


def _add_monitor_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.monitor.command import add_monitor_arguments

    add_monitor_arguments(parser)


def _run_monitor(args: argparse.Namespace) -> int:
    from dmoe_cli.monitor.command import run_monitor_command

    return run_monitor_command(args)


def _add_plot_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.plot import add_plot_arguments

    add_plot_arguments(parser)


def _run_plot(args: argparse.Namespace) -> int:
    from dmoe_cli.plot import run_plot_command

    return run_plot_command(args)


def _add_generate_args(parser: argparse.ArgumentParser) -> None:
    from dmoe_cli.generate import add_generate_arguments

    add_generate_arguments(parser)


def _run_generate(args: argparse.Namespace) -> int:
    from dmoe_cli.generate import run_generate_command

    return run_generate_command(args)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "dht": (
        "run a bootstrap DHT node that peers and clients join (it also relays for peers behind NAT)",
        _add_dht_args,
        _run_dht,
    ),
    "peer": ("host experts: serve them over gRPC and announce them in the DHT", _add_peer_args, _run_peer),
    "status": ("list the experts a swarm holds, with their replicas and load", _add_status_args, _run_status),
    "train": (
        "train the reference character-level transformer over the swarm",
        _add_train_args,
        lambda args: _jobs().run_train_command(args),
    ),
    "swarm": ("run a whole local swarm: a DHT node and N peer processes on 127.0.0.1", _add_swarm_args, _run_swarm),
    "demo": ("the main job: a local swarm, training over it, sampled text, clean shutdown", _add_demo_args, _run_demo),
    "bench": (
        "benchmarks side by side with hivemind and the in-process limit; writes JSON and BENCHMARKS.md",
        _add_bench_args,
        _run_bench,
    ),
    "infer": (
        "sample text from a trained client checkpoint",
        _add_infer_args,
        lambda args: _jobs().run_infer_command(args),
    ),
    "generate": (
        "greedy text from a Hugging Face MoE checkpoint whose experts the swarm hosts (dmoe swarm --hf-model)",
        _add_generate_args,
        _run_generate,
    ),
    "monitor": (
        "a web page, a JSON API and Prometheus metrics of a swarm: health, experts, peers, throughput",
        _add_monitor_args,
        _run_monitor,
    ),
    "plot": ("draw the loss and tokens/s of a `dmoe train --log-csv` file as a PNG", _add_plot_args, _run_plot),
}

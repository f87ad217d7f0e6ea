"""`dmoe monitor`: flags (one per `MonitorConfig` field) and the command that serves until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from dmoe_cli.config_args import add_config_arguments, add_required_initial_peers, config_from_args
from dmoe_cli.logs import setup_logging
from dmoe_cli.monitor.config import MonitorConfig


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dmoe monitor`; `--initial-peers` may come from `DMOE_INITIAL_PEERS` instead."""
    add_config_arguments(parser, MonitorConfig, skip=("initial_peers",))
    add_required_initial_peers(parser, "join")


def run_monitor_command(args: argparse.Namespace) -> int:
    """Join the DHT as a client, serve the page, the JSON API and the metrics until Ctrl-C or SIGTERM."""
    from dht import DHTNode
    from dmoe_cli.commands import run_async

    setup_logging(args.verbose)
    config = config_from_args(MonitorConfig, args)
    if not config.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {config.timeout}")
    # the DHT child process is forked before the event loop and gRPC start their threads
    with DHTNode(initial_peers=config.initial_peers, client_mode=True, call_timeout=config.timeout) as node:
        try:
            run_async(_serve(config, node))
        finally:
            if config.addr_file:
                Path(config.addr_file).unlink(missing_ok=True)
    return 0


async def _serve(config: MonitorConfig, node) -> None:
    from dmoe_cli.monitor.app import run_monitor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def on_ready(url: str) -> None:
        if config.addr_file:
            from peer import atomic_write_bytes

            atomic_write_bytes(config.addr_file, f"{url}\n".encode())
        print(f"monitor serving {url} (JSON: {url}api/v1/state, Prometheus: {url}metrics); Ctrl-C stops it", flush=True)

    await run_monitor(config, node, stop, on_ready=on_ready)
    print("monitor stopped", flush=True)

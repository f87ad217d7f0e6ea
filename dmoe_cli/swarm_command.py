"""`dmoe swarm`: run a whole local swarm (`dmoe_cli.swarm.LocalSwarm`) until Ctrl-C, optionally in chaos mode.

It starts the swarm, writes the DHT node's multiaddrs to `--addr-file` (atomically, once every peer serves: the
file is the sign that the swarm is ready), prints how to connect, reports peers that die, and stops everything on
SIGINT/SIGTERM. With `--chaos-kill-every` it runs `dmoe_cli.chaos.Chaos` over the swarm.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from dmoe_cli.chaos import Chaos, prepare_chaos
from dmoe_cli.config_args import add_config_arguments, config_from_args
from dmoe_cli.logs import setup_logging
from dmoe_cli.swarm import LocalSwarm, SwarmConfig, SwarmStartError

# How a Python program reaches the swarm.
PYTHON_SNIPPET = """\
    from router_client import RemoteMixtureOfExperts
    moe = RemoteMixtureOfExperts({hidden}, ({count},), "{prefix}", k_best=2, initial_peers={initial_peers!r})"""
HF_PYTHON_SNIPPET = """\
    from router_client import load_hf_model
    model = load_hf_model({folder!r}, uid_prefix="{prefix}", initial_peers={initial_peers!r})"""


def _summary(swarm: LocalSwarm) -> str:
    config = swarm.config
    uids = swarm.uids
    maddr = swarm.initial_peers[0]
    replicas = f"{config.replicas} replica{'s' if config.replicas > 1 else ''} each"
    kind = f"of {config.hf_model}" if config.hf_model else f"{config.expert_cls}, hidden {config.hidden_dim}"
    lines = [
        f"dmoe swarm: {config.peers} peers serving {len(uids)} experts ({uids[0]} … {uids[-1]}, {replicas}, {kind})",
        f"DHT node: {maddr}",
    ]
    for i, (endpoint, hosted, popen) in enumerate(
        zip(swarm.peer_endpoints, swarm.assignments, swarm.peer_processes, strict=True)
    ):
        lines.append(f"  peer {i}  {endpoint:<21}  pid {popen.pid:<8} {' '.join(hosted)}")
    lines += [
        f"logs: {swarm.log_dir} (dht.log, peer-<i>.log)",
        *([f"checkpoints: {config.checkpoint_dir}/peer-<i>"] if config.checkpoint_dir else []),
        *([f"DHT multiaddrs written to {config.addr_file}"] if config.addr_file else []),
        "",
        "Connect to it:",
        f"    dmoe status --initial-peers {maddr} --prefix {config.expert_prefix}",
        *_client_lines(config, maddr, len(uids)),
        "",
        "Ctrl-C (or SIGTERM) stops the swarm.",
    ]
    return "\n".join(lines)


def _client_lines(config: SwarmConfig, maddr: str, count: int) -> list[str]:
    if config.hf_model:
        prefix = config.expert_prefix
        return [
            f"    dmoe generate --hf-model {config.hf_model} --uid-prefix {prefix} --initial-peers {maddr} "
            "--prompt-ids 1,2,3 --max-new-tokens 8",
            HF_PYTHON_SNIPPET.format(folder=config.hf_model, prefix=prefix, initial_peers=[maddr]),
        ]
    return [PYTHON_SNIPPET.format(initial_peers=[maddr], hidden=config.hidden_dim, count=count, prefix=config.prefix)]


def _write_addr_file(path: str, maddrs: list[str]) -> None:
    from peer import atomic_write_bytes  # torch comes with it: imported only when a file is asked for

    atomic_write_bytes(path, "".join(f"{m}\n" for m in maddrs).encode())


def run_swarm(config: SwarmConfig, *, verbose: bool = False) -> int:
    """Run a local swarm until SIGINT/SIGTERM: start it, print how to use it, report peers that die, stop it.

    Returns the exit code: 0 after a clean stop, 1 when the swarm failed to start.
    """
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set():
            print("already stopping; please wait", file=sys.stderr, flush=True)
            return
        stopping.set()
        raise KeyboardInterrupt

    swarm = LocalSwarm(config, verbose=verbose)
    chaos_line = prepare_chaos(swarm.config, swarm.log_dir)  # ValueError for impossible settings, before anything runs
    chaos: Chaos | None = None
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting a DHT node and {config.peers} peers (logs in {swarm.log_dir}) ...", flush=True)
        if chaos_line:
            print(chaos_line, flush=True)
        try:
            swarm.start()
        except SwarmStartError as error:
            print(f"the swarm failed to start: {error}", file=sys.stderr, flush=True)
            return 1
        if config.addr_file:
            _write_addr_file(config.addr_file, swarm.initial_peers)
        print(_summary(swarm), flush=True)
        if config.chaos_kill_every:
            chaos = Chaos(
                swarm,
                config.chaos_kill_every,
                restart=config.chaos_restart,
                seed=config.chaos_seed,
                events_file=config.chaos_events,
            )
            chaos.start()
        while not stopping.wait(1.0):
            for child in swarm.newly_exited():
                print(
                    f"{child.name} (pid {child.popen.pid}) exited unexpectedly with code {child.popen.returncode}; "
                    f"not restarting it. The end of its log ({child.log_path}):\n{child.tail(20)}",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        if chaos is not None:
            chaos.stop()
        print("stopping the swarm ...", flush=True)
        swarm.stop()
        if chaos is not None:
            chaos.join(10.0)
            print(chaos.summary(), flush=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("swarm stopped", flush=True)
    return 0


def add_swarm_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dmoe swarm`: one per SwarmConfig field, and `dmoe peer` flags after `--`."""
    add_config_arguments(parser, SwarmConfig)
    parser.add_argument(
        "peer_args",
        nargs="*",
        metavar="-- PEER_FLAGS",
        help="flags passed to every `dmoe peer`, after `--` (e.g. `-- --lr 0.01 --optimizer sgd`)",
    )


def run_swarm_command(args: argparse.Namespace) -> int:
    """`dmoe swarm`: run a local swarm until Ctrl-C."""
    setup_logging(args.verbose)
    config = config_from_args(SwarmConfig, args)
    config.extra_peer_args = [*config.extra_peer_args, *getattr(args, "peer_args", [])]
    return run_swarm(config, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    """`python -m dmoe_cli.swarm_command`: the same as `dmoe swarm`."""
    parser = argparse.ArgumentParser(prog="dmoe swarm", description="run a whole local swarm as processes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_swarm_arguments(parser)
    return run_swarm_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

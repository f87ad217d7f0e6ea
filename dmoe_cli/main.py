"""The `dmoe` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported: no fork-handler chatter

from dmoe_cli import commands  # noqa: E402

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

DESCRIPTION = """\
dmoe: a decentralized Mixture-of-Experts. Volunteer peers host experts and announce them in a DHT;
clients route tokens to them over gRPC.

Start a swarm by hand:
  dmoe dht --addr-file dht.txt                       # a bootstrap DHT node
  dmoe peer --initial-peers $(head -1 dht.txt) --experts 'ffn.[0:4]' --hidden-dim 64
  dmoe status --initial-peers $(head -1 dht.txt) --prefix ffn
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dmoe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _run) in commands.COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    _help, _add, run = commands.COMMANDS[args.command]
    try:
        return run(args) or 0
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as exc:  # mistakes a user can fix: one clear line, no traceback
        print(f"dmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

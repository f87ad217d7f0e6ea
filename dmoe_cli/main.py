"""The `dmoe` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported: no fork-handler chatter

from dmoe_cli import commands  # noqa: E402

USER_ERROR = 2  # the command line or a file it names is wrong: fix it and run again
FAILURE = 1  # the swarm or a process could not do the job: what to check is in the message
INTERRUPTED = 130  # stopped by Ctrl-C (128 + SIGINT), as shells report it

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

# Failures dmoe raises on purpose, by (module, class name): a module that was never imported cannot have raised
# its error, so nothing heavy is imported to recognise them.
EXPECTED_FAILURES: tuple[tuple[str, str], ...] = (
    ("dht", "DHTUnavailableError"),
    ("dmoe_cli.swarm", "SwarmStartError"),
    ("peer.p2p_service", "RelayUnavailableError"),
    ("router_client", "RemoteExpertError"),
)

DESCRIPTION = """\
dmoe: a decentralized Mixture-of-Experts. Volunteer peers host experts and announce them in a DHT;
clients route tokens to them over gRPC.

Start a swarm by hand:
  dmoe dht --addr-file dht.txt                       # a bootstrap DHT node
  dmoe peer --initial-peers $(head -1 dht.txt) --experts 'ffn.[0:4]' --hidden-dim 64
  dmoe status --initial-peers $(head -1 dht.txt) --prefix ffn

Exit codes: 0 done, 1 the job failed (the message says what to check), 2 a bad flag, address or file,
130 interrupted by Ctrl-C. Add -v to see the traceback behind an error.
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line that points to --help, with exit code 2."""

    def error(self, message: str):
        """Print `PROG: error: MESSAGE (see PROG --help)` on stderr and exit with code 2."""
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand; with `only`, just that subcommand gets its flags.

    Adding a subcommand's flags imports the modules of its configs (torch, grpc, hivemind for some), so the
    command line builds only what the chosen subcommand needs: a peer starts sooner.
    """
    parser = OneLineErrorParser(
        prog="dmoe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _run) in commands.COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if only is None or name == only:
            add_arguments(sub)
    return parser


def chosen_command(argv: list[str]) -> str:
    """The subcommand a command line names ("" when none does, as in ``dmoe --help``)."""
    return next((word for word in argv if not word.startswith("-")), "") if argv else ""


def exit_code_for(error: BaseException) -> int | None:
    """The exit code of an error a user should see as one line, or None for a bug (shown with its traceback)."""
    if isinstance(error, USER_ERRORS):
        return USER_ERROR
    for module_name, class_name in EXPECTED_FAILURES:
        error_class = getattr(sys.modules.get(module_name), class_name, None)
        if error_class is not None and isinstance(error, error_class):
            return FAILURE
    return None


def error_line(command: str, error: BaseException) -> str:
    """`dmoe COMMAND: error: MESSAGE` on one line, whatever line breaks the message has."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return f"dmoe {command}: error: {message}"


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[list[int]]:
    """Within the block, Ctrl-C is noted (in the yielded list) instead of raised.

    A KeyboardInterrupt raised inside the import of a C extension leaves it half-initialised, and later code
    fails in odd ways (an abort in pybind11, a RecursionError) instead of stopping cleanly.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored, or someone else's handler
        yield []
        return
    interrupted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand; returns the exit code.

    Expected errors (bad input, an unreachable swarm, a swarm that did not start, experts that could not answer)
    print one line on stderr and give exit code 2 (the user's input) or 1 (the job failed); Ctrl-C gives 130.
    With -v the traceback is printed before that line.
    """
    argv = sys.argv[1:] if argv is None else argv
    command = chosen_command(argv)
    with _ctrl_c_deferred() as interrupted:  # the parser and the DHT layer import torch, grpc and hivemind
        parser = build_parser(only=command)
        if command in commands.COMMANDS:
            import dht  # noqa: F401  (every job but `swarm` needs it, and Ctrl-C must not land inside its imports)
    if interrupted:
        print("dmoe: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    args = parser.parse_args(argv)
    _help, _add, run = commands.COMMANDS[args.command]
    try:
        return run(args) or 0
    except KeyboardInterrupt:
        print(f"dmoe {args.command}: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception as error:
        code = exit_code_for(error)
        if code is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(error_line(args.command, error), file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""A warm template for a local swarm's restarts: a process that has imported a peer's code and forks peers from it.

    python -m dmoe_cli.standby

Imports everything `dmoe peer` needs (torch, grpc, hivemind, and torch._dynamo, which torch's optimizers import
when the first one is built: most of a peer's start-up), prints ``{"ready": true}``, then reads JSON lines from
stdin, ``{"argv": ["peer", ...], "log": PATH}``. For each it forks a child in a session of its own that sends its
output to PATH (appending) and runs ``dmoe`` with that command line, and prints ``{"pid": N}``; when a child
exits it prints ``{"exit": N, "code": C}``. A fork costs no imports, so a restarted peer serves within about a
second. It forks before any thread, channel or server exists (it has none of its own), and exits when stdin
closes; its children get SIGTERM when it dies. `dmoe_cli.swarm.LocalSwarm` keeps one for chaos restarts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import select
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _run_child(order: dict, prctl) -> None:
    """In the forked child: become the peer the order describes; never returns."""
    code = 1
    try:
        os.setsid()
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the child's whole life
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from dmoe_cli.main import main as dmoe_main

        code = dmoe_main(list(order["argv"]))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a bug in the peer: its traceback goes to its log
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> int:
    """Import the peer's code, then fork a peer per order until stdin closes."""
    from dmoe_cli.main import build_parser

    build_parser(only="peer")  # imports what the peer's flags and its code need
    import torch._dynamo  # noqa: F401  (what torch's optimizers import when the first one is built)

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if sys.platform.startswith("linux") else None
    prctl = libc.prctl if libc is not None else None
    _say({"ready": True})
    buffered = b""
    while True:
        readable, _, _ = select.select([sys.stdin.buffer.raw], [], [], 0.2)
        while True:  # reap the children that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if not readable:
            continue
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            return 0
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            if not line.strip():
                continue
            order = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _run_child(order, prctl)
            _say({"pid": pid})


if __name__ == "__main__":
    sys.exit(main())

"""`python -m dmoe_cli.slot COMMAND ...`: give each replica of a scaled service its own checkpoint directory.

`docker compose up --scale peer=4` starts identical containers, and compose cannot give each its own named
volume: they all mount the same one. This launcher replaces `{slot}` in `DMOE_CHECKPOINT_DIR` (say
`/data/peer-{slot}`) by the lowest slot number whose directory no running process holds, keeps an exclusive
`flock` on `<dir>/.slot.lock` for as long as the command runs (the lock is inherited across `exec`), and then
execs COMMAND in its place. So every running peer writes to its own directory, and a peer that is restarted
or recreated takes over a free directory and resumes the checkpoints in it (the replicas of a compose
service host the same experts, so any free slot's checkpoints are theirs to resume). Without `{slot}` in the
variable it simply execs COMMAND.

    DMOE_CHECKPOINT_DIR=/data/peer-{slot} python -m dmoe_cli.slot dmoe peer --experts 'ffn.[0:8]'

Limits: the lock needs every replica on the same host (one Docker engine, a local volume); a network file
system without working `flock` cannot keep the slots apart.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

VARIABLE = "DMOE_CHECKPOINT_DIR"
PLACEHOLDER = "{slot}"
LOCK_NAME = ".slot.lock"
MAX_SLOTS = 4096


def claim_slot(template: str, max_slots: int = MAX_SLOTS) -> tuple[int, Path, int]:
    """Lock the first free `template` directory: (slot number, directory, the locked file descriptor).

    The descriptor is inheritable; the slot stays taken until every process holding it has exited.
    Raises RuntimeError when all `max_slots` slots are taken.
    """
    for slot in range(max_slots):
        directory = Path(template.replace(PLACEHOLDER, str(slot)))
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)
        return slot, directory, fd
    raise RuntimeError(f"all {max_slots} slots of {template} are taken")


def main(argv: list[str] | None = None) -> int:
    """Claim a slot for DMOE_CHECKPOINT_DIR and exec the command (does not return when it succeeds)."""
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if command else 2
    env = dict(os.environ)
    template = env.get(VARIABLE, "")
    if PLACEHOLDER in template:
        slot, directory, _fd = claim_slot(template)
        env[VARIABLE] = str(directory)
        print(f"slot {slot}: {VARIABLE}={directory}", file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], command, env)
    except OSError as error:
        print(f"cannot run {command[0]!r}: {error}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())

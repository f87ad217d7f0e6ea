"""The DHT child process: hivemind's `DHT` with a command reader that cannot corrupt its pipe.

hivemind 1.1.12 reads commands in its event loop after ``loop.add_reader(pipe)``; uvloop makes that pipe
non-blocking, so a command larger than what one ``write`` puts in the pipe (``multiprocessing`` writes the
header and a payload over 16 KiB separately) is read half-way, fails with ``BlockingIOError``, and leaves the
stream misaligned: every later command is lost and callers wait forever. This is the "DHT died at start with a
BlockingIOError in its pipe" seen in dmoe. `DHTProcess` reads commands with blocking reads in a thread instead
and hands whole commands to the event loop.

It also kills itself when the process that started it disappears (hivemind's process would keep running, and
keep its port, after its parent was killed with SIGKILL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import hivemind
from hivemind.dht.node import DHTNode as HivemindDHTNode
from hivemind.p2p import P2P
from hivemind.utils import switch_to_uvloop

logger = logging.getLogger(__name__)


class DHTProcess(hivemind.DHT):
    """`hivemind.DHT` (same constructor and client API) with the robust command reader described above."""

    def run(self) -> None:
        """Serve the DHT until a ``_shutdown`` command; this is the body of the child process."""
        threading.Thread(target=_exit_when_orphaned, args=(self._parent_pid,), daemon=True, name="orphan").start()
        loop = switch_to_uvloop()
        loop.run_until_complete(self._serve(loop))
        loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process stops
        try:
            p2p = None
            if self._daemon_listen_maddr is not None:
                p2p = await P2P.replicate(self._daemon_listen_maddr)
            self._node = await HivemindDHTNode.create(
                initial_peers=self.initial_peers,
                num_workers=self.num_workers,
                record_validator=self._record_validator,
                p2p=p2p,
                **self.kwargs,
            )
        except Exception as exc:
            logger.debug("DHT node failed to start", exc_info=True)
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)

        commands: asyncio.Queue = asyncio.Queue()
        threading.Thread(
            target=_read_commands, args=(self._inner_pipe, loop, commands), daemon=True, name="commands"
        ).start()
        while True:
            method, args, kwargs = await commands.get()
            task = asyncio.create_task(getattr(self, method)(*args, **kwargs))
            if method == "_shutdown":
                await task
                break


def _read_commands(pipe, loop: asyncio.AbstractEventLoop, commands: asyncio.Queue) -> None:
    """Thread: receive whole commands with blocking reads and queue them on the event loop."""
    while True:
        try:
            command = pipe.recv()
        except (EOFError, OSError):
            command = ("_shutdown", [], {})
        except Exception:  # a command that does not unpickle: the stream is still aligned, skip it
            logger.exception("DHT process received a command it could not unpickle")
            continue
        loop.call_soon_threadsafe(commands.put_nowait, command)
        if command[0] == "_shutdown":
            return


def _exit_when_orphaned(parent_pid: int) -> None:
    """Thread: SIGKILL this process (its p2pd child then exits on its own) once `parent_pid` is gone."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)

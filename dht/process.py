"""The DHT child process and the parent's channel to it.

`DHTProcess` is a `hivemind.DHT` (same constructor; coroutines still receive ``(dht, node)``) whose
command and result plumbing is replaced, because hivemind 1.1.12's fails in two ways seen in dmoe:

* Commands are read in the event loop after ``loop.add_reader(pipe)``; uvloop makes that pipe non-blocking,
  so a command over 16 KiB (``multiprocessing`` writes its header and such a payload separately) is read
  half-way and fails with ``BlockingIOError``, leaving the stream misaligned: every later command is lost and
  callers wait forever. Here a thread reads whole commands with blocking reads.
* Results travel through `MPFuture`, i.e. one pipe per parent process guarded by one lock shared by *all*
  DHT processes of that parent. A DHT process killed while holding that lock (it holds it while writing any
  result) blocks every other DHT process of the parent forever, including its own replacement. Here each
  process has its own result pipe, written by its event loop only, so no lock is needed.

Each process also exits when its parent goes away: on EOF of its command pipe, or, as a backstop, when a
watchdog thread sees that its parent process changed.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import itertools
import logging
import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import hivemind
from hivemind.dht.node import DHTNode as HivemindDHTNode
from hivemind.p2p import P2P
from hivemind.utils import switch_to_uvloop

from dht import calls

logger = logging.getLogger(__name__)

_READY = -1  # call id of the message that reports the end of start-up
_SHUTDOWN = ("shutdown",)
# What a submitted call's Future resolves to: ("ok", result) | ("timeout", None) | ("error", exception)
# | ("dead", None) when the process went away first.
Outcome = tuple[str, Any]


class DHTProcess(hivemind.DHT):
    """A DHT node in a child process, with one command pipe and one result pipe of its own.

    Parent side: `start_serving`, `wait_ready`, `submit` (returns a `concurrent.futures.Future` of an
    `Outcome`), `shutdown`. Child side: `run`. Construct with hivemind.DHT's arguments (``start`` is implied
    False; call `start_serving`).
    """

    def __init__(self, initial_peers=None, **kwargs):
        super().__init__(initial_peers, start=False, **kwargs)
        self._commands_r, self._commands_w = mp.Pipe(duplex=False)
        self._results_r, self._results_w = mp.Pipe(duplex=False)
        self._pending: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._started_ok: Future = Future()
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ parent side

    def start_serving(self) -> None:
        """Fork the child process and start reading its results."""
        self.start()
        for unused in (self._commands_r, self._results_w, self._inner_pipe, self._outer_pipe):
            unused.close()  # so that EOF on our ends means the child is gone
        threading.Thread(target=self._read_results, daemon=True, name=f"dht-results-{self.pid}").start()

    def wait_ready(self, timeout: float) -> Outcome | None:
        """The start-up outcome (``("ok", None)`` or ``("error", exc)``), or None if it is not known yet."""
        try:
            return self._started_ok.result(timeout)
        except TimeoutError:
            return None

    def submit(self, coro_fn: Callable, timeout: float, *, wait_writable: float) -> Future | None:
        """Send ``coro_fn(dht, node)`` to run for at most `timeout` s; None if the process does not read its pipe.

        Waits up to `wait_writable` seconds for room in the command pipe: a pipe that stays full means the
        process stopped reading (hung), and a write would then block forever.
        """
        future: Future = Future()
        if self._stopped.is_set():
            future.set_result(("dead", None))
            return future
        with self._send_lock:
            if not _writable(self._commands_w, wait_writable):
                return None
            call_id = next(self._call_ids)
            with self._pending_lock:
                self._pending[call_id] = future
            try:
                self._commands_w.send((call_id, coro_fn, timeout))
            except BaseException:
                with self._pending_lock:
                    self._pending.pop(call_id, None)
                raise
        return future

    def forget(self, future: Future) -> None:
        """Stop tracking a call whose caller gave up (its result, if it ever comes, is dropped)."""
        with self._pending_lock:
            for call_id, pending in list(self._pending.items()):
                if pending is future:
                    del self._pending[call_id]

    def shutdown(self, graceful: bool = True, grace: float = 3.0) -> None:
        """Stop the process within a bounded time.

        `graceful`: ask it to exit, wait up to `grace` s, then SIGTERM, then SIGKILL. Otherwise (a dead or hung
        process being replaced) SIGKILL at once; its p2pd daemon exits by itself when its client is gone.
        """
        try:
            if graceful and self.is_alive():
                with self._send_lock:
                    if _writable(self._commands_w, 0.5):
                        self._commands_w.send(_SHUTDOWN)
                self.join(grace)
                if self.is_alive():
                    self.terminate()
                    self.join(1.0)
            if self.is_alive():
                self.kill()
                self.join(2.0)
        except Exception as exc:  # already closed pipes, a process that never started, ...
            logger.debug("while stopping DHT process %s: %r", self.pid, exc)
        finally:
            self._mark_stopped()
            try:
                self._commands_w.close()
            except OSError:
                pass

    def __del__(self):
        pass  # hivemind.DHT.__del__ would use the pipes replaced here; owners call shutdown()

    def _read_results(self) -> None:
        """Thread: deliver results to their futures until the child closes its end (it died or stopped)."""
        try:
            while not self._stopped.is_set():
                if not self._results_r.poll(0.5):
                    continue
                call_id, outcome = self._results_r.recv()
                if call_id == _READY:
                    _resolve(self._started_ok, outcome)
                    continue
                with self._pending_lock:
                    future = self._pending.pop(call_id, None)
                if future is not None:
                    _resolve(future, outcome)
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("unreadable result from DHT process %s", self.pid)
        finally:
            self._mark_stopped()
            try:
                self._results_r.close()
            except OSError:
                pass

    def _mark_stopped(self) -> None:
        self._stopped.set()
        _resolve(self._started_ok, ("dead", None))
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            _resolve(future, ("dead", None))

    # ------------------------------------------------------------------ child side

    def run(self) -> None:
        """Serve the DHT until told to stop or orphaned; this is the body of the child process."""
        # Objects inherited from the parent (gRPC channels, torch state, ...) must never be finalised here:
        # their threads did not survive the fork, and collecting them segfaulted the child (seen in CI).
        gc.freeze()
        faulthandler.enable()
        self._commands_w.close()
        self._results_r.close()
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
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
            self._send_result(_READY, ("error", calls.picklable(exc)))
            return
        self._send_result(_READY, ("ok", None))

        commands: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=_read_commands, args=(self._commands_r, loop, commands), daemon=True).start()
        while True:
            command = await commands.get()
            if command == _SHUTDOWN:
                break
            call_id, coro_fn, timeout = command
            asyncio.create_task(self._execute(call_id, coro_fn, timeout))
        await self._node.shutdown()

    async def _execute(self, call_id: int, coro_fn: Callable, timeout: float) -> None:
        self._send_result(call_id, await calls.call_with_deadline(self, self._node, coro_fn, timeout))

    def _send_result(self, call_id: int, outcome: Outcome) -> None:
        """Send from the event loop thread only: one writer, so whole messages, no lock."""
        try:
            try:
                self._results_w.send((call_id, outcome))
            except OSError:
                raise
            except Exception as exc:  # the result does not pickle; nothing was written, the stream is intact
                self._results_w.send((call_id, ("error", RuntimeError(f"unpicklable DHT call result: {exc!r}"))))
        except OSError:
            pass  # the parent is gone


def _read_commands(pipe, loop: asyncio.AbstractEventLoop, commands: asyncio.Queue) -> None:
    """Thread: receive whole commands with blocking reads and queue them on the event loop."""
    while True:
        try:
            command = pipe.recv()
        except (EOFError, OSError):  # the parent closed its end or died
            command = _SHUTDOWN
        except Exception:  # a command that does not unpickle: the stream is still aligned, skip it
            logger.exception("DHT process received a command it could not unpickle")
            continue
        loop.call_soon_threadsafe(commands.put_nowait, command)
        if command == _SHUTDOWN:
            return


def _exit_when_orphaned(parent_pid: int) -> None:
    """Thread: SIGKILL this process (its p2pd child then exits on its own) once `parent_pid` is gone."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _resolve(future: Future, outcome: Outcome) -> None:
    if not future.done():
        try:
            future.set_result(outcome)
        except Exception:  # set concurrently by another thread
            pass


def _writable(pipe, timeout: float) -> bool:
    """True if `pipe` accepts a write within `timeout` seconds."""
    poller = select.poll()
    poller.register(pipe.fileno(), select.POLLOUT)
    return bool(poller.poll(max(0.0, timeout) * 1000.0))

"""Where expert compute runs: one piece at a time, in passes, on the peer's compute thread or, when small, on the
event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

INLINE_MAX_SECONDS = 0.0005
"""A piece expected to take at most this long is short: a pass of short pieces may run on the event loop."""

INLINE_PASS_MAX_SECONDS = 0.002
"""...as long as they are expected to take at most this long together (the loop serves nothing meanwhile)."""


@dataclass(frozen=True)
class Phases:
    """How a piece's function (as its ``phases`` attribute) computes in three parts, so that the pieces of one pass
    whose `joint` is the same share its middle part: ``begin(*args)`` gives a state, ``joint(states)`` runs once
    for all of them, ``end(state)`` gives the piece's result. Should `joint` fail, each piece's state is `reset` and
    the piece's function runs alone, so that one piece's failure stays its own."""

    begin: Callable[..., Any]
    joint: Callable[[list[Any]], None]
    end: Callable[[Any], Any]
    reset: Callable[[Any], None]


Done = Callable[[bool, Any, float], None]
"""Called on the event loop when a piece's pass ends: (ok, its result or the exception it raised, its seconds)."""


@dataclass(slots=True)
class _Piece:
    fn: Callable[..., Any]
    args: tuple
    expected: float | None
    on_done: Done
    outcome: tuple[bool, Any] | None = None  # (ok, value or exception), set by the pass
    seconds: float = 0.0


class ComputeRunner:
    """Runs compute (forward, backward, checkpoint snapshots) strictly one piece at a time, in passes.

    The pieces submitted in one event-loop tick (the experts of one ForwardMany, batches of several queues that
    became ready together) form one *pass*: they run one after the other in a single trip to the compute thread,
    so that the pass pays one hop there and one back instead of two per piece, and their callers are answered
    together when the pass ends. A pass runs right on the event loop instead when every piece comes with an
    expected duration (`expected`, in seconds) under `INLINE_MAX_SECONDS`, together under
    `INLINE_PASS_MAX_SECONDS`, while the compute thread is idle: the two thread hops cost more than such work
    (see bench/NOTES.md). A lock keeps the
    two places from ever computing at the same time. A piece that raises fails alone; the others of its pass
    still run. `passes` and `inline_passes` count the passes started, and those of them run on the event loop.
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dmoe-compute")
        self._lock = threading.Lock()
        self._next_pass: list[_Piece] | None = None
        self.passes = self.inline_passes = 0

    async def set_threads(self, threads: int) -> None:
        """Compute with `threads` torch intra-op threads, on the compute thread and on the event loop alike (each
        thread's OpenMP keeps its own count, and one pass must compute the same wherever it runs)."""
        torch.set_num_threads(threads)
        await asyncio.get_running_loop().run_in_executor(self._executor, torch.set_num_threads, threads)

    def submit(self, fn: Callable[..., Any], args: tuple, *, on_done: Done, expected: float | None = None) -> None:
        """Add `fn(*args)` to this tick's pass (call on the event loop); `on_done` gets its outcome there."""
        if self._next_pass is None:
            self._next_pass = []
            asyncio.get_running_loop().call_soon(self._start_pass)
        self._next_pass.append(_Piece(fn, args, expected, on_done))

    async def run(self, fn: Callable[..., T], *args: Any, expected: float | None = None) -> T:
        """`fn(*args)` as part of this tick's pass; `expected`: the seconds the caller expects it to take."""
        return (await self.run_timed(fn, *args, expected=expected))[0]

    async def run_timed(self, fn: Callable[..., T], *args: Any, expected: float | None = None) -> tuple[T, float]:
        """Like `run`, and also the seconds `fn` itself took (not the rest of its pass)."""
        future = asyncio.get_running_loop().create_future()

        def done(ok: bool, value: Any, seconds: float) -> None:
            if not future.done():
                if ok:
                    future.set_result((value, seconds))
                else:
                    future.set_exception(value)

        self.submit(fn, args, on_done=done, expected=expected)
        return await future

    def _start_pass(self) -> None:
        pieces, self._next_pass = self._next_pass or [], None
        if not pieces:
            return
        self.passes += 1
        expected = [piece.expected for piece in pieces]
        short = (
            None not in expected and max(expected) <= INLINE_MAX_SECONDS and sum(expected) <= INLINE_PASS_MAX_SECONDS
        )
        if short and self._lock.acquire(blocking=False):
            self.inline_passes += 1
            try:
                _compute(pieces)
            finally:
                self._lock.release()
                _settle(pieces)
            return
        try:
            done = asyncio.get_running_loop().run_in_executor(self._executor, self._locked, pieces)
        except RuntimeError as exc:  # shut down: the callers learn it instead of waiting forever
            _settle(pieces, exc)
            return
        done.add_done_callback(lambda finished: _settle(pieces, finished.exception()))

    def _locked(self, pieces: list[_Piece]) -> None:
        with self._lock:
            _compute(pieces)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the compute thread (after the work already queued when `wait`)."""
        self._executor.shutdown(wait=wait)


def _compute(pieces: list[_Piece]) -> None:
    groups: dict[Callable, list[_Piece]] = {}
    for piece in pieces:
        phases = getattr(piece.fn, "phases", None)
        if phases is None:
            _run_alone(piece)
        else:
            groups.setdefault(phases.joint, []).append(piece)
    for joint, members in groups.items():
        if len(members) == 1:
            _run_alone(members[0])
        else:
            _run_jointly(joint, members)


def _run_alone(piece: _Piece) -> None:
    started = time.perf_counter()
    try:
        piece.outcome = (True, piece.fn(*piece.args))
    except Exception as exc:  # this piece fails alone
        piece.outcome = (False, exc)
    piece.seconds = time.perf_counter() - started


def _run_jointly(joint: Callable[[list[Any]], None], pieces: list[_Piece]) -> None:
    """`Phases` pieces sharing `joint`: each begins, the joint part runs once, each ends; seconds are split evenly."""
    started = time.perf_counter()
    begun: list[tuple[_Piece, Any]] = []
    for piece in pieces:
        try:
            begun.append((piece, piece.fn.phases.begin(*piece.args)))
        except Exception as exc:  # this piece fails alone
            piece.outcome = (False, exc)
    try:
        joint([state for _, state in begun])
    except Exception:
        logger.warning("a joint compute pass failed; computing its %d pieces one by one", len(begun), exc_info=True)
        for piece, state in begun:
            piece.fn.phases.reset(state)
        for piece, _ in begun:
            _run_alone(piece)
        return
    for piece, state in begun:
        try:
            piece.outcome = (True, piece.fn.phases.end(state))
        except Exception as exc:
            piece.outcome = (False, exc)
    share = (time.perf_counter() - started) / len(pieces)
    for piece in pieces:
        piece.seconds = share


def _settle(pieces: list[_Piece], failure: BaseException | None = None) -> None:
    """On the loop: hand each piece's outcome to its `on_done` (`failure`: the pass itself broke off)."""
    for piece in pieces:
        ok, value = piece.outcome or (False, failure or RuntimeError("the compute pass ended before this piece ran"))
        try:
            piece.on_done(ok, value, piece.seconds)
        except Exception:  # one caller's bug must not keep the others of the pass waiting
            logger.exception("a compute callback failed")

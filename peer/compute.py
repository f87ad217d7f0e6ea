"""Where expert compute runs: one piece at a time, on the peer's compute thread or, when small, on the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

INLINE_MAX_SECONDS = 0.0005
"""Compute expected to take at most this long may run on the event loop instead of the compute thread."""


class ComputeRunner:
    """Runs compute (forward, backward, checkpoint snapshots) strictly one piece at a time.

    Work goes to a single compute thread, so the event loop stays free for I/O. Work the caller expects to be
    short (`inline=True`: under `INLINE_MAX_SECONDS`) runs right on the event loop when the compute thread is
    idle: the two thread hops it saves cost more than such work itself (see bench/NOTES.md). A lock keeps the
    two places from ever computing at the same time.
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dmoe-compute")
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """`fn(*args)`, on the event loop when `inline` and nothing else computes, else on the compute thread."""
        if inline and self._lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                self._lock.release()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._locked, fn, args)

    def _locked(self, fn: Callable[..., T], args: tuple) -> T:
        with self._lock:
            return fn(*args)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the compute thread (after the work already queued when `wait`)."""
        self._executor.shutdown(wait=wait)

"""The one event loop per process that runs every remote call of the router, in a daemon thread.

PyTorch modules are called synchronously; the gRPC calls they make are asynchronous. All channels live on
this loop, so they are reused across calls and modules. `run(coro, timeout)` blocks the caller until the
coroutine finishes, and cancels it when the timeout passes, so a caller never waits forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """The router's background event loop (uvloop when installed), started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="dmoe-router-loop", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the background loop and wait for its result, at most `timeout` seconds."""
    loop = get_loop()
    if _running_on(loop):
        raise RuntimeError("router calls cannot block inside the router's own event loop")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"remote call did not finish within {timeout:.2f} s") from None


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False

"""The one event loop per process that runs every remote call of the router, in a daemon thread.

PyTorch modules are called synchronously; the gRPC calls they make are asynchronous. All channels live on
this loop, so they are reused across calls and modules. `run(coro, timeout)` blocks the caller until the
coroutine finishes, and cancels it when the timeout passes, so a caller never waits forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
GIL_SWITCH_INTERVAL = 0.0005
"""The GIL switch interval this process gets once the loop starts, unless it is already lower (CPython: 5 ms)."""


def get_loop() -> asyncio.AbstractEventLoop:
    """The router's background event loop (uvloop when installed), started on first use.

    Starting it lowers the GIL switch interval: the caller's thread waits for answers that this loop's thread
    hands over, and at CPython's default 5 ms it could wait that long for the GIL after every answer.
    """
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
                sys.setswitchinterval(GIL_SWITCH_INTERVAL)
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

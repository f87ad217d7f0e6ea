"""Imports that a DHT node never needs, deferred until something uses them: a peer starts (and restarts) faster.

``import hivemind`` (which any ``hivemind.*`` import runs) imports hivemind's averaging, and with it
``scipy.optimize``, for its load balancing: a large share of a peer's start-up, for code dmoe never calls.
`defer_unused_imports` puts a stand-in module in its place; the real one is imported on the first attribute
that is looked up on the stand-in, so a program that does use it (a hivemind averager, say) gets it unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

DEFERRED_MODULES = ("scipy.optimize",)


class _DeferredModule(types.ModuleType):
    """Stands in for a module not imported yet; the first attribute looked up imports it and is read from it."""

    def __getattr__(self, name: str):
        real = self.__dict__.get("_real_module")
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
            self.__dict__["_real_module"] = real
        return getattr(real, name)


def defer_unused_imports(names: tuple[str, ...] = DEFERRED_MODULES) -> None:
    """Put a stand-in for each module in `names` that is installed and not imported yet."""
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        module = _DeferredModule(name)
        module.__spec__ = importlib.util.spec_from_loader(name, loader=None)
        sys.modules[name] = module

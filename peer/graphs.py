"""Forward graphs kept for the Backward that follows, so that a training step computes the forward once.

A client that trains sends a nonzero `forward_id` with its Forward and the same id with the Backward. The peer
runs such a Forward with autograd on and keeps its graph here; the Backward then only runs autograd's backward
pass through it, instead of recomputing the forward first (Learning@home's design, which costs a training step
4 units of expert compute where in-process autograd takes 3). The store is bounded in bytes (LRU) and in age,
so forwards whose Backward never comes (the client failed over, died, or only evaluated) cannot pin memory.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KeptForward:
    """One Forward with its graph: the input leaves, the outputs, the parameter versions it used, its size, and
    the graph it is part of, with its row there, when several experts were computed together
    (`peer.joint_forward.SharedGraph`)."""

    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    param_versions: tuple[int, ...]
    nbytes: int
    created: float = field(default_factory=time.monotonic)
    shared: Any = None
    row: int = 0


class ForwardGraphStore:
    """Kept forwards of every expert of one peer, keyed by (uid, forward_id), bounded by `max_bytes` and `max_age`.

    Adding an entry evicts the least recently added ones until it fits, and drops those older than `max_age`
    seconds. Not thread-safe: only compute uses it, one piece at a time (`peer.compute.ComputeRunner`).
    `hits`, `misses` and `evicted` count Backwards that reused a graph, Backwards that had to recompute, and
    graphs dropped unused.
    """

    def __init__(self, max_bytes: int, max_age: float = 120.0):
        self.max_bytes, self.max_age = max_bytes, max_age
        self.nbytes = 0
        self.hits = self.misses = self.evicted = 0
        self._entries: collections.OrderedDict[tuple[str, int], KeptForward] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, uid: str, forward_id: int, entry: KeptForward) -> bool:
        """Keep `entry`; False (nothing kept) when it alone exceeds `max_bytes`."""
        self._drop_expired(entry.created)
        previous = self._entries.pop((uid, forward_id), None)
        if previous is not None:
            self.nbytes -= previous.nbytes
        if entry.nbytes > self.max_bytes:
            return False
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            self._evict_oldest()
        self._entries[(uid, forward_id)] = entry
        self.nbytes += entry.nbytes
        return True

    def pop(self, uid: str, forward_id: int) -> KeptForward | None:
        """The kept forward for this id (removed from the store), or None."""
        entry = self._entries.pop((uid, forward_id), None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def _drop_expired(self, now: float) -> None:
        while self._entries and now - next(iter(self._entries.values())).created > self.max_age:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        self.evicted += 1

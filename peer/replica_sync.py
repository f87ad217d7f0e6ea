"""Replicas that stay one expert: periodic averaging with the other live replicas, and catching up at start.

Every `period` seconds of wall-clock time (rounds ``r = floor(time / period)``, so that replicas on machines with
synchronised clocks meet in the same round), each peer snapshots the experts it hosts, waits `gather_delay`
seconds for the other replicas to snapshot theirs, fetches every other live replica's snapshot of that round
(`GetState(uid, round)`), and moves its expert by ``mean - own snapshot``. The mean is taken over the snapshots
ordered by peer id, so every replica that gathered the same snapshots computes the same bits: once training
stops, one complete round makes all replicas identical, parameters, optimizer moments and update count alike.
A replica that could not be reached is left out of that round (the others still agree with each other); it
joins again in the next one.

`catch_up` is run before a peer announces its experts: for each expert it asks the live replicas for their
update counts, and when one is ahead of the local state (a checkpoint older than the swarm), or the expert has
no checkpoint at all (a new volunteer), it loads the current state of the replica furthest ahead, so the peer's
first answer is already the swarm's expert.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dht import ExpertDirectory, ExpertReplica
from peer.backend import ExpertBackend
from peer.compute import ComputeRunner
from peer.replica_state import ExpertState, apply_average, average, capture, restore

logger = logging.getLogger(__name__)

LIVE_ROUND = 0
"""The round number that asks for a replica's state as it is now, rather than a round's snapshot."""


class StateSource(Protocol):
    """How a peer reaches other replicas: their update counts and their states (see `peer.state_client`)."""

    def update_count(self, endpoint: str, uid: str, *, timeout: float) -> Awaitable[int]:
        """The update count of `uid` at `endpoint`."""

    def fetch(self, endpoint: str, uid: str, round_number: int, *, timeout: float) -> Awaitable[ExpertState]:
        """The snapshot of `uid` taken at `round_number` at `endpoint` (`LIVE_ROUND`: its state now)."""


@dataclass
class SyncStats:
    """What the averaging has done: rounds run, experts averaged and replicas that could not be reached."""

    rounds: int = 0
    averaged: int = 0
    unreachable: int = 0
    caught_up: dict[str, int] = field(default_factory=dict)
    """uid -> the update count loaded from a live replica at start."""


class ReplicaSync:
    """Averages the hosted experts with their other live replicas every `period` seconds (see the module doc).

    `backends` are the hosted experts; `compute` orders the snapshots and updates with all other compute;
    `directory` finds the replicas; `own_peer_id()` tells this peer's records apart; `source` reaches the other
    peers; `period` 0 runs no rounds. `state(uid, round)` serves this peer's snapshots to the others (the
    servicer's `GetState`).
    """

    def __init__(
        self,
        backends: Mapping[str, ExpertBackend],
        compute: ComputeRunner,
        directory: ExpertDirectory,
        own_peer_id: Callable[[], str],
        source: StateSource,
        *,
        period: float,
        gather_delay: float | None = None,
        timeout: float = 30.0,
    ):
        if period < 0:
            raise ValueError(f"the sync period must be 0 (no averaging rounds) or positive, got {period}")
        self.backends, self.compute, self.directory = backends, compute, directory
        self.own_peer_id, self.source = own_peer_id, source
        self.period = period
        self.gather_delay = min(2.0, period / 4) if gather_delay is None else gather_delay  # 0 with no rounds
        self.timeout = timeout
        self.stats = SyncStats()
        self._snapshots: dict[int, dict[str, ExpertState]] = {}

    # ------------------------------------------------------------------ serving

    async def state(self, uid: str, round_number: int) -> ExpertState | None:
        """This peer's state of `uid`: its snapshot of `round_number`, or now for `LIVE_ROUND`; None if absent."""
        if uid not in self.backends:
            return None
        if round_number == LIVE_ROUND:
            return await self.compute.run(capture, self.backends[uid])
        return self._snapshots.get(round_number, {}).get(uid)

    # ------------------------------------------------------------------ catching up

    async def catch_up(self, fresh: Collection[str] = ()) -> dict[str, int]:
        """Load, for each hosted expert, the state of the live replica furthest ahead when it is ahead of ours.

        The experts in `fresh` (started without a checkpoint) load a live replica's state even when it is not
        ahead, so that a new replica is the swarm's expert rather than a random initialisation.
        """
        replicas = await self._other_replicas()
        for uid, others in replicas.items():
            backend = self.backends[uid]
            counts = await asyncio.gather(
                *(self.source.update_count(r.endpoint, uid, timeout=self.timeout) for r in others),
                return_exceptions=True,
            )
            floor = -1 if uid in fresh else backend.update_count
            ahead = sorted(
                (count, replica.peer_id, replica)
                for count, replica in zip(counts, others, strict=True)
                if isinstance(count, int) and count > floor
            )
            for count, _peer, replica in reversed(ahead):  # furthest ahead first; the next one if it fails
                try:
                    state = await self.source.fetch(replica.endpoint, uid, LIVE_ROUND, timeout=self.timeout)
                    await self.compute.run(restore, backend, state)
                except Exception as exc:  # unreachable, or a state that does not fit: try the next one
                    logger.warning("could not load %s from %s: %s", uid, replica.endpoint, exc)
                    continue
                self.stats.caught_up[uid] = backend.update_count
                logger.info("%s: loaded the live state of %s (%d updates)", uid, replica.endpoint, count)
                break
        return dict(self.stats.caught_up)

    # ------------------------------------------------------------------ averaging

    async def run(self) -> None:
        """Average every round until cancelled (a period of 0 means no rounds: serving and `catch_up` only)."""
        if self.period == 0:
            return
        while True:
            round_number = math.floor(time.time() / self.period) + 1
            await asyncio.sleep(max(0.0, round_number * self.period - time.time()))
            try:
                await self.sync_round(round_number)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed round must not end the averaging
                logger.exception("averaging round %d failed", round_number)

    async def sync_round(self, round_number: int) -> None:
        """Snapshot the experts that have replicas elsewhere, gather those replicas' snapshots of the same round,
        and move to their mean (an expert hosted nowhere else is not copied at all)."""
        replicas = await self._other_replicas()
        snapshots = {uid: await self.compute.run(capture, self.backends[uid]) for uid in replicas}
        self._snapshots[round_number] = snapshots
        for old in [r for r in self._snapshots if r < round_number - 1]:
            del self._snapshots[old]
        await asyncio.sleep(self.gather_delay)
        await asyncio.gather(*(self._average(uid, round_number, others) for uid, others in replicas.items()))
        self.stats.rounds += 1

    async def _average(self, uid: str, round_number: int, others: list[ExpertReplica]) -> None:
        own = self._snapshots[round_number][uid]
        fetched = await asyncio.gather(
            *(self.source.fetch(r.endpoint, uid, round_number, timeout=self.timeout) for r in others),
            return_exceptions=True,
        )
        states = [(self.own_peer_id(), own)]
        for replica, state in zip(others, fetched, strict=True):
            if isinstance(state, ExpertState):
                states.append((replica.peer_id, state))
            else:
                self.stats.unreachable += 1
                logger.debug("%s: no round-%d state from %s: %s", uid, round_number, replica.endpoint, state)
        if len(states) < 2:
            return
        mean = average([state for _peer, state in sorted(states, key=lambda item: item[0])])
        await self.compute.run(apply_average, self.backends[uid], own, mean)
        self.stats.averaged += 1

    async def _other_replicas(self) -> dict[str, list[ExpertReplica]]:
        """Live replicas of each hosted expert on other peers (experts without any are left out)."""
        found = await self.directory.get(list(self.backends), use_cache=False, timeout=self.timeout, return_future=True)
        own = self.own_peer_id()
        others = {uid: [r for r in replicas if r.peer_id != own] for uid, replicas in found.items()}
        return {uid: replicas for uid, replicas in others.items() if replicas}

"""Routing state, kept apart from the transport that measures it: bans with backoff, dead replicas, latencies,
order."""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dht import ExpertReplica

REVIVAL_GRACE = 2.0
"""Seconds after a revival during which a refused connection only bans the endpoint instead of marking it dead
again: the client's channel may still be waiting out its reconnect backoff while the peer already serves."""


@dataclass
class _PeerState:
    latency: float | None = None  # smoothed seconds of a successful call
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))
    failures_in_a_row: int = 0
    banned_until: float = 0.0
    ban_reason: str = ""
    permanent: bool = False
    newest_record: float = -math.inf  # latest expiration_time seen in the DHT for this endpoint
    dead_record: float | None = None  # set while dead: the newest record it had when it refused connections
    dead_reason: str = ""
    revived_at: float = -math.inf


class PeerScores:
    """What the router knows about each peer endpoint.

    - A failure bans the endpoint for `ban_base * 2**(failures in a row - 1)` seconds (at most `ban_max`);
      a success clears the ban and the count.
    - An endpoint that refuses connections (or says it is shutting down) is *dead* (`mark_dead`): it is not
      tried while any other replica of the expert is left, and it makes no expert usable, until the DHT
      lists a record of it newer than the newest one it had when it was marked (`observe`): a restarted or
      re-announcing peer produces one, a crashed peer never does.
    - `usable_endpoints` / `unusable_endpoints`: not banned, not dead, not caught lying.
    - `order(replicas)` sorts the replicas of one expert: unbanned first, by smoothed latency times a load
      factor from the peer's reported queue; banned ones last (so that when all are banned, we try anyway).
    - `hedge_delay(endpoint)` is the p95 of its recent latencies, once there are enough of them.
    """

    def __init__(self, *, ban_base: float = 1.0, ban_max: float = 60.0):
        self.ban_base, self.ban_max = ban_base, ban_max
        self._peers: dict[str, _PeerState] = collections.defaultdict(_PeerState)
        self._dead: set[str] = set()

    def record_success(self, endpoint: str, latency: float) -> None:
        """A call to `endpoint` succeeded after `latency` seconds."""
        state = self._peers[endpoint]
        state.latency = latency if state.latency is None else 0.8 * state.latency + 0.2 * latency
        state.recent.append(latency)
        if not state.permanent:
            state.failures_in_a_row, state.banned_until, state.ban_reason = 0, 0.0, ""
            self._clear_dead(endpoint, state)

    def record_failure(self, endpoint: str, reason: str) -> None:
        """A call to `endpoint` failed: ban it with exponential backoff."""
        state = self._peers[endpoint]
        if state.permanent:
            return
        state.failures_in_a_row += 1
        duration = min(self.ban_max, self.ban_base * 2.0 ** min(state.failures_in_a_row - 1, 30))
        state.banned_until = time.monotonic() + duration
        state.ban_reason = reason

    def mark_dead(self, replica: ExpertReplica, reason: str) -> None:
        """`replica`'s endpoint refused the connection: dead until a newer DHT record of it appears.

        A replica without a finite `expiration_time` (not from the DHT) can never be revived, and one revived
        less than `REVIVAL_GRACE` seconds ago may still be reconnecting: both are banned instead.
        """
        state = self._peers[replica.endpoint]
        if state.permanent:
            return
        if not math.isfinite(replica.expiration_time) or time.monotonic() - state.revived_at < REVIVAL_GRACE:
            self.record_failure(replica.endpoint, reason)
            return
        state.newest_record = max(state.newest_record, replica.expiration_time)
        state.dead_record, state.dead_reason = state.newest_record, reason
        self._dead.add(replica.endpoint)

    def observe(self, replicas: Iterable[ExpertReplica]) -> list[str]:
        """Records just listed in the DHT: revive dead endpoints that have a newer one; returns those endpoints."""
        newest: dict[str, float] = {}
        for replica in replicas:
            newest[replica.endpoint] = max(newest.get(replica.endpoint, -math.inf), replica.expiration_time)
        revived = []
        for endpoint, expiration in newest.items():
            state = self._peers[endpoint]
            state.newest_record = max(state.newest_record, expiration)
            if state.dead_record is not None and expiration > state.dead_record:
                self._clear_dead(endpoint, state)
                state.failures_in_a_row, state.banned_until, state.ban_reason = 0, 0.0, ""
                state.revived_at = time.monotonic()
                revived.append(endpoint)
        return revived

    def _clear_dead(self, endpoint: str, state: _PeerState) -> None:
        state.dead_record, state.dead_reason = None, ""
        self._dead.discard(endpoint)

    def is_dead(self, endpoint: str) -> bool:
        """Whether `endpoint` refused connections and has not been listed with a newer record since."""
        return endpoint in self._dead

    def dead(self) -> dict[str, str]:
        """Dead endpoints, with the reason."""
        return {endpoint: self._peers[endpoint].dead_reason for endpoint in self.dead_endpoints()}

    def dead_endpoints(self) -> set[str]:
        """The dead endpoints. Marks whose record has expired are dropped: the DHT no longer lists that record,
        and any record that lists the endpoint again is newer."""
        now = time.time()  # records expire in DHT time, which is Unix time
        for endpoint in [e for e in list(self._dead) if (self._peers[e].dead_record or 0.0) < now]:
            self._clear_dead(endpoint, self._peers[endpoint])
        return set(self._dead)

    def ban_forever(self, endpoint: str, reason: str) -> None:
        """Ban `endpoint` for the rest of this run (caught lying); it is never tried again."""
        state = self._peers[endpoint]
        state.banned_until, state.ban_reason, state.permanent = float("inf"), reason, True

    def is_banned(self, endpoint: str) -> bool:
        """Whether `endpoint` is banned right now."""
        state = self._peers.get(endpoint)
        return state is not None and state.banned_until > time.monotonic()

    def _is_permanently_banned(self, endpoint: str) -> bool:
        state = self._peers.get(endpoint)
        return state is not None and state.permanent

    def banned(self) -> dict[str, str]:
        """Endpoints banned right now, with the reason."""
        now = time.monotonic()
        return {e: s.ban_reason for e, s in list(self._peers.items()) if s.banned_until > now}

    def unusable_endpoints(self) -> set[str]:
        """Endpoints that should not be chosen now: banned (for now or for good) or dead."""
        now = time.monotonic()
        return {e for e, s in list(self._peers.items()) if s.banned_until > now} | self.dead_endpoints()

    def is_usable(self, endpoint: str) -> bool:
        """Whether `endpoint` is neither banned nor dead."""
        return not self.is_banned(endpoint) and not self.is_dead(endpoint)

    def score(self, replica: ExpertReplica) -> float:
        """Expected cost of a call to this replica (lower is better)."""
        state = self._peers.get(replica.endpoint)
        latency = state.latency if state is not None and state.latency is not None else 0.0
        return (latency + 1e-3) * (1.0 + 0.25 * replica.queue_size)

    def order(self, replicas: list[ExpertReplica], preferred: str | None = None) -> list[ExpertReplica]:
        """Replicas best first; `preferred` (an endpoint) goes first unless banned; liars are left out, and so
        are dead replicas unless nothing else is left."""
        if len(replicas) == 1:  # most experts of a big grid have one replica: nothing to order
            return [] if self._is_permanently_banned(replicas[0].endpoint) else list(replicas)
        replicas = [r for r in replicas if not self._is_permanently_banned(r.endpoint)]
        alive = [r for r in replicas if not self.is_dead(r.endpoint)]
        shuffled = random.sample(alive or replicas, len(alive or replicas))  # ties broken at random: spreads load
        return sorted(
            shuffled,
            key=lambda r: (self.is_banned(r.endpoint), r.endpoint != preferred, self.score(r)),
        )

    def typical_latency(self, endpoint: str) -> float | None:
        """Smoothed latency of `endpoint`'s successful calls, or None before the first one."""
        state = self._peers.get(endpoint)
        return None if state is None else state.latency

    def hedge_delay(self, endpoint: str) -> float | None:
        """p95 of the recent latencies of `endpoint`, or None while fewer than 8 are known."""
        state = self._peers.get(endpoint)
        if state is None or len(state.recent) < 8:
            return None
        ordered = sorted(state.recent)
        return ordered[int(0.95 * (len(ordered) - 1))]

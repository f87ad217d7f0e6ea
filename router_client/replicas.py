"""Routing state, kept apart from the transport that measures it: bans with backoff, latencies, order."""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field

from dht import ExpertReplica


@dataclass
class _PeerState:
    latency: float | None = None  # smoothed seconds of a successful call
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))
    failures_in_a_row: int = 0
    banned_until: float = 0.0
    ban_reason: str = ""
    permanent: bool = False


class PeerScores:
    """What the router knows about each peer endpoint.

    - A failure bans the endpoint for `ban_base * 2**(failures in a row - 1)` seconds (at most `ban_max`);
      a success clears the ban and the count.
    - `order(replicas)` sorts the replicas of one expert: unbanned first, by smoothed latency times a load
      factor from the peer's reported queue; banned ones last (so that when all are banned, we try anyway).
    - `hedge_delay(endpoint)` is the p95 of its recent latencies, once there are enough of them.
    """

    def __init__(self, *, ban_base: float = 1.0, ban_max: float = 60.0):
        self.ban_base, self.ban_max = ban_base, ban_max
        self._peers: dict[str, _PeerState] = collections.defaultdict(_PeerState)

    def record_success(self, endpoint: str, latency: float) -> None:
        """A call to `endpoint` succeeded after `latency` seconds."""
        state = self._peers[endpoint]
        state.latency = latency if state.latency is None else 0.8 * state.latency + 0.2 * latency
        state.recent.append(latency)
        if not state.permanent:
            state.failures_in_a_row, state.banned_until, state.ban_reason = 0, 0.0, ""

    def record_failure(self, endpoint: str, reason: str) -> None:
        """A call to `endpoint` failed: ban it with exponential backoff."""
        state = self._peers[endpoint]
        if state.permanent:
            return
        state.failures_in_a_row += 1
        duration = min(self.ban_max, self.ban_base * 2.0 ** min(state.failures_in_a_row - 1, 30))
        state.banned_until = time.monotonic() + duration
        state.ban_reason = reason

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
        return {e: s.ban_reason for e, s in self._peers.items() if s.banned_until > now}

    def score(self, replica: ExpertReplica) -> float:
        """Expected cost of a call to this replica (lower is better)."""
        state = self._peers.get(replica.endpoint)
        latency = state.latency if state is not None and state.latency is not None else 0.0
        return (latency + 1e-3) * (1.0 + 0.25 * replica.queue_size)

    def order(self, replicas: list[ExpertReplica], preferred: str | None = None) -> list[ExpertReplica]:
        """Replicas best first; `preferred` (an endpoint) goes first unless banned; liars are left out."""
        replicas = [r for r in replicas if not self._is_permanently_banned(r.endpoint)]
        shuffled = random.sample(replicas, len(replicas))  # ties are broken at random: spreads the load
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

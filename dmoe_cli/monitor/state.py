"""What the monitor knows about a swarm: each poll's raw findings (`Poll`) merged into a remembered view
(`SwarmTracker`), whose `snapshot()` is the JSON of ``/api/v1/state``.

The tracker remembers every expert it has seen (and those of the grid it was given), so that an expert whose
replicas are gone or unreachable stays on the page, shown as down, instead of silently dropping out of the
listing. Peers that left the DHT are kept for `forget_peers_after` seconds, shown as unreachable.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dht import UID_DELIMITER, ExpertReplica, split_uid
from proto.info import ExpertStatus

STATE_VERSION = 1
"""Bumped when a field of ``/api/v1/state`` changes meaning or goes away (new fields do not bump it)."""

TRANSPORT_DIRECT = "direct"
"""A peer reached over gRPC at its announced endpoint (the only transport so far)."""

IDLE_AFTER = 3.0
"""Seconds without a new batch after which an expert counts as idle: a peer's smoothed tokens/s is refreshed only
when it computes, so the last figure of a busy expert would otherwise stay on the chart after its work stops.
An expert counts as idle from its first sight until its batch count grows."""


@dataclass
class Poll:
    """One look at the swarm: the DHT listing and each listed peer's Info answer (or why there was none).

    `at` is Unix time. `listing` is None when the DHT could not answer (`dht_error` says why); `answers` maps the
    endpoints that answered Info to their experts, `failures` the others to a reason.
    """

    at: float
    listing: dict[str, list[ExpertReplica]] | None
    dht_error: str | None = None
    answers: dict[str, list[ExpertStatus]] = field(default_factory=dict)
    peer_ids: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


@dataclass
class _Peer:
    endpoint: str
    peer_id: str = ""
    listed_uids: list[str] = field(default_factory=list)  # as the DHT listed them last
    listed: bool = False  # named by the last successful listing
    statuses: dict[str, ExpertStatus] = field(default_factory=dict)
    last_batch: dict[str, tuple[int, float]] = field(default_factory=dict)  # uid -> (batches, when it last grew)
    reachable: bool = False
    error: str | None = None
    first_seen: float = 0.0
    last_seen: float | None = None  # last successful Info answer
    last_listed: float = 0.0  # last poll whose listing named this endpoint
    record_expires: float | None = None


def grid_uids(prefix: str, grid: Sequence[int]) -> list[str]:
    """Every uid of a grid: ``grid_uids("ffn", (2, 3))`` is ffn.0.0 … ffn.1.2."""
    return [UID_DELIMITER.join([prefix, *map(str, coords)]) for coords in itertools.product(*map(range, grid))]


def uid_sort_key(uid: str) -> tuple:
    """Sort uids by their coordinates as numbers (ffn.2 before ffn.10)."""
    return tuple(int(part) if part.isdigit() else part for part in uid.split(UID_DELIMITER))


class SwarmTracker:
    """Merges polls into what the monitor shows; `snapshot()` is the ``/api/v1/state`` document.

    `grid` (e.g. ``(8,)`` or ``(4, 8)``) names experts that should exist even before any was seen;
    `history_seconds` of throughput are kept for the chart; peers gone from the DHT are forgotten after
    `forget_peers_after` seconds. Not thread-safe: one event loop updates and reads it.
    """

    def __init__(
        self,
        prefix: str,
        *,
        grid: Sequence[int] = (),
        poll_seconds: float = 2.0,
        history_seconds: float = 600.0,
        forget_peers_after: float = 600.0,
    ):
        self.prefix, self.grid = prefix.rstrip(UID_DELIMITER), tuple(grid)
        self.poll_seconds, self.history_seconds, self.forget_peers_after = (
            poll_seconds,
            history_seconds,
            forget_peers_after,
        )
        self.known_uids: set[str] = set(grid_uids(self.prefix, self.grid)) if self.grid else set()
        self.replicas: dict[str, list[ExpertReplica]] = {}
        self.peers: dict[str, _Peer] = {}
        self.history: collections.deque[tuple[float, float]] = collections.deque()
        self.polls = 0
        self.last_poll: float | None = None
        self.dht_error: str | None = None

    def update(self, poll: Poll) -> None:
        """Take in one poll (a failed DHT listing keeps the previous one, flagged by `dht_error`)."""
        self.polls += 1
        self.last_poll, self.dht_error = poll.at, poll.dht_error
        if poll.listing is not None:
            self.replicas = {uid: list(rs) for uid, rs in poll.listing.items() if rs}
            self.known_uids.update(self.replicas)
            listed = replicas_by_endpoint(self.replicas)
            for endpoint, replicas in listed.items():
                peer = self.peers.get(endpoint)
                if peer is None:
                    peer = self.peers[endpoint] = _Peer(endpoint, first_seen=poll.at)
                peer.peer_id = replicas[0].peer_id
                peer.listed_uids = sorted({r.uid for r in replicas}, key=uid_sort_key)
                peer.listed, peer.last_listed = True, poll.at
                peer.record_expires = max(r.expiration_time for r in replicas)
            for endpoint, peer in self.peers.items():
                if endpoint not in listed:
                    peer.listed, peer.record_expires = False, None
        for endpoint, statuses in poll.answers.items():
            peer = self.peers.get(endpoint)
            if peer is None:
                continue
            peer.statuses = {s.uid: s for s in statuses}
            for status in statuses:
                batches, since = peer.last_batch.get(status.uid, (status.batches_processed, -math.inf))
                if status.batches_processed != batches:  # computed since the last poll: its rate is current
                    since = poll.at
                peer.last_batch[status.uid] = (status.batches_processed, since)
            peer.reachable, peer.error, peer.last_seen = True, None, poll.at
            peer.peer_id = poll.peer_ids.get(endpoint) or peer.peer_id
        for endpoint, reason in poll.failures.items():
            peer = self.peers.get(endpoint)
            if peer is not None:  # its last statuses stay: the table shows the update counts it had
                peer.reachable, peer.error = False, reason
        for endpoint, peer in list(self.peers.items()):
            if not peer.listed:
                peer.reachable = False
                peer.error = "no longer listed in the DHT (its records expired or were withdrawn)"
                if poll.at - peer.last_listed > self.forget_peers_after:
                    del self.peers[endpoint]
        self.history.append((poll.at, self.tokens_per_second()))
        while self.history and self.history[0][0] < poll.at - self.history_seconds:
            self.history.popleft()

    def is_live(self, replica: ExpertReplica) -> bool:
        """Whether the replica's peer answered the last Info and still hosts the expert."""
        peer = self.peers.get(replica.endpoint)
        return peer is not None and peer.reachable and replica.uid in peer.statuses

    def tokens_per_second(self) -> float:
        """The swarm's throughput: tokens/s of every reachable peer's experts, summed."""
        return sum(self._rate(p, uid) for p in self.peers.values() if p.reachable for uid in p.statuses)

    def _rate(self, peer: _Peer, uid: str) -> float:
        """The expert's reported tokens/s, or 0 once it has computed no batch for `IDLE_AFTER` seconds."""
        _batches, since = peer.last_batch.get(uid, (0, -math.inf))
        idle = self.last_poll is not None and self.last_poll - since > IDLE_AFTER
        return 0.0 if idle else peer.statuses[uid].tokens_per_second

    def grid_shape(self) -> list[int]:
        """The grid's size per dimension: the given grid, else one past the largest coordinate seen."""
        if self.grid:
            return list(self.grid)
        shape: list[int] = []
        for uid in self.known_uids:
            _, coords = split_uid(uid)
            shape = [max(a, b + 1) for a, b in itertools.zip_longest(shape, coords, fillvalue=-1)]
        return shape

    def snapshot(self) -> dict:
        """The ``/api/v1/state`` document (fields described in the README, section Monitor)."""
        experts = [self._expert(uid) for uid in sorted(self.known_uids, key=uid_sort_key)]
        peers = [self._peer(self.peers[e]) for e in sorted(self.peers)]
        down = [e["uid"] for e in experts if e["live_replicas"] == 0]
        return {
            "version": STATE_VERSION,
            "prefix": self.prefix,
            "grid": self.grid_shape(),
            "updated_at": self.last_poll,
            "poll_seconds": self.poll_seconds,
            "polls": self.polls,
            "dht_error": self.dht_error,
            "health": {
                "status": "down" if experts and len(down) == len(experts) else ("degraded" if down else "ok"),
                "experts": len(experts),
                "experts_live": len(experts) - len(down),
                "experts_down": down,
                "peers": len(peers),
                "peers_reachable": sum(p["reachable"] for p in peers),
                "tokens_per_second": round(self.tokens_per_second(), 1),
            },
            "experts": experts,
            "peers": peers,
            "throughput": [[round(t, 3), round(v, 1)] for t, v in self.history],
        }

    def _expert(self, uid: str) -> dict:
        _, coords = split_uid(uid)
        replicas = self.replicas.get(uid, [])
        live = [r for r in replicas if self.is_live(r)]
        statuses = [self.peers[r.endpoint].statuses[uid] for r in live]
        rate = sum(self._rate(self.peers[r.endpoint], uid) for r in live)
        return {
            "uid": uid,
            "coords": list(coords),
            "replicas": len(replicas),
            "live_replicas": len(live),
            "status": "ok" if live else "down",
            "endpoints": [r.endpoint for r in replicas],
            "live_endpoints": [r.endpoint for r in live],
            "update_count": max((s.update_count for s in statuses), default=None),
            "tokens_per_second": round(rate, 1),
            "queue_size": sum(s.queue_size for s in statuses),
        }

    def _peer(self, peer: _Peer) -> dict:
        statuses = peer.statuses
        return {
            "endpoint": peer.endpoint,
            "peer_id": peer.peer_id,
            "transport": TRANSPORT_DIRECT,
            "experts": sorted(statuses, key=uid_sort_key) if statuses and peer.reachable else list(peer.listed_uids),
            "reachable": peer.reachable,
            "listed": peer.listed,
            "error": peer.error,
            "tokens_per_second": round(sum(self._rate(peer, uid) for uid in statuses), 1) if peer.reachable else 0.0,
            "queue_size": sum(s.queue_size for s in statuses.values()) if peer.reachable else 0,
            "update_counts": {uid: statuses[uid].update_count for uid in sorted(statuses, key=uid_sort_key)},
            "batches_processed": sum(s.batches_processed for s in statuses.values()),
            "requests_expired": sum(s.requests_expired for s in statuses.values()),
            "version": None,
            "first_seen": peer.first_seen,
            "last_seen": peer.last_seen,
            "record_expires": peer.record_expires,
        }


def replicas_by_endpoint(listing: Mapping[str, Sequence[ExpertReplica]]) -> dict[str, list[ExpertReplica]]:
    """The replicas of a listing grouped by the endpoint that hosts them."""
    grouped: dict[str, list[ExpertReplica]] = {}
    for replica in itertools.chain.from_iterable(listing.values()):
        grouped.setdefault(replica.endpoint, []).append(replica)
    return grouped

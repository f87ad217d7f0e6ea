"""The experts that exist under a prefix, with their replicas: a cached view of the DHT, refreshed in the
background so that routing never waits for a DHT round trip once the first listing has arrived."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dht import ExpertDirectory, ExpertReplica, split_uid
from router_client.replicas import PeerScores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogView:
    """One consistent listing: live uids, their grid coordinates (rows match uids) and their replicas, and for
    each endpoint the rows of the experts it hosts."""

    uids: list[str]
    coords: np.ndarray
    replicas: dict[str, list[ExpertReplica]]
    experts_at: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, uids: list[str], coords: np.ndarray, replicas: dict[str, list[ExpertReplica]]) -> CatalogView:
        """A view of these experts (rows of `coords` match `uids`)."""
        experts_at: dict[str, list[int]] = {}
        for row, uid in enumerate(uids):
            for replica in replicas[uid]:
                experts_at.setdefault(replica.endpoint, []).append(row)
        return cls(uids, coords, replicas, experts_at)

    def usable(self, unusable_endpoints: set[str]) -> np.ndarray:
        """Per uid (a bool array), whether at least one of its replicas is at an endpoint not in the set."""
        mask = np.ones(len(self.uids), dtype=bool)
        affected = {row for endpoint in unusable_endpoints for row in self.experts_at.get(endpoint, ())}
        for row in affected:
            mask[row] = any(r.endpoint not in unusable_endpoints for r in self.replicas[self.uids[row]])
        return mask


class ExpertCatalog:
    """Live experts of one grid (`prefix`, `grid_size`), as uids, coordinates and replicas.

    `await catalog.snapshot(deadline)` returns the cached listing; when it is older than `ttl`, a refresh
    starts in the background and the cached one is still used (stale-while-revalidate). Only the very
    first call (or one after the listing came back empty) waits for the DHT, within the caller's deadline.
    With `trusted_peers` (peer ids), replicas hosted by any other peer are ignored.

    With `scores`, every listing is shown to them (`PeerScores.observe`), which revives dead replicas that
    have a newer record; while any listed replica is dead, the listing is re-read every `recheck` seconds (if that is
    sooner than `ttl`), so that a restarted peer is routed to again soon after it announces itself.
    Must be used from the router's event loop.
    """

    def __init__(
        self,
        directory: ExpertDirectory,
        prefix: str,
        grid_size: tuple[int, ...],
        *,
        ttl: float = 5.0,
        trusted_peers: frozenset[str] | None = None,
        scores: PeerScores | None = None,
        recheck: float = 1.0,
    ):
        self.directory, self.prefix, self.grid_size, self.ttl = directory, prefix.rstrip("."), tuple(grid_size), ttl
        self.trusted_peers, self.scores, self.recheck = trusted_peers, scores, recheck
        self.view = CatalogView.build([], np.zeros((0, len(self.grid_size)), dtype=np.int64), {})
        self._fetched_at = -float("inf")
        self._refresh: asyncio.Task | None = None

    def _max_age(self) -> float:
        if self.scores is not None and any(e in self.view.experts_at for e in self.scores.dead_endpoints()):
            return min(self.ttl, self.recheck)
        return self.ttl

    def is_fresh(self) -> bool:
        """Whether the cached listing is filled and young enough that no refresh is due."""
        return bool(self.view.uids) and time.monotonic() - self._fetched_at <= self._max_age()

    async def snapshot(self, deadline: float) -> CatalogView:
        """The current listing, fetched first if there is none yet (bounded by `deadline`)."""
        stale = time.monotonic() - self._fetched_at > self._max_age()
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self._fetch(timeout=max(self.ttl, 10.0)))
        if not self.view.uids and self._refresh is not None and not self._refresh.done():
            remaining = deadline - time.monotonic()
            if remaining > 0:
                await asyncio.wait([self._refresh], timeout=remaining)
        return self.view

    async def _fetch(self, timeout: float) -> None:
        try:  # this catalog is the cache: the directory's own cache would only make the listing older
            listing = await asyncio.to_thread(
                self.directory.list_experts, self.prefix, use_cache=False, timeout=timeout
            )
        except Exception as exc:
            logger.warning("could not list experts under %r: %s", self.prefix, exc)
            self._fetched_at = time.monotonic() - self.ttl * 0.8  # retry soon
            return
        if self.trusted_peers is not None:
            listing = {uid: [r for r in rs if r.peer_id in self.trusted_peers] for uid, rs in listing.items()}
        uids, coords = [], []
        for uid in sorted(listing):
            _, grid = split_uid(uid)
            if len(grid) == len(self.grid_size) and all(c < g for c, g in zip(grid, self.grid_size, strict=True)):
                if listing[uid]:
                    uids.append(uid)
                    coords.append(grid)
        coords_array = np.array(coords, dtype=np.int64).reshape(len(uids), len(self.grid_size))
        replicas = {uid: listing[uid] for uid in uids}
        if self.scores is not None:
            revived = self.scores.observe(r for rs in replicas.values() for r in rs)
            if revived:
                logger.info("replicas at %s announced themselves again; routing to them", ", ".join(revived))
        self.view = CatalogView.build(uids, coords_array, replicas)  # one atomic swap
        self._fetched_at = time.monotonic() - (self.ttl * 0.8 if not uids else 0.0)  # empty: look again soon
        logger.debug("catalog %s: %d live experts", self.prefix, len(uids))


def load_trusted_peers(path: str) -> frozenset[str]:
    """Peer ids from a file, one per line (blank lines and `#` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    peers = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
    if not peers:
        raise ValueError(f"{path} lists no peer ids: routing would have nowhere to go")
    return peers

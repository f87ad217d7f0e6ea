"""The router's own parsed, cached copy of one expert grid's prefix records, searched with a batched beam search.

A warm forward reads no DHT at all; a cold one (or one that meets a prefix it has never seen) costs one DHT round
trip per grid level for the whole batch. Cached prefixes older than the TTL are refreshed in the background while
the cached ones keep serving (stale-while-revalidate). The grid is never listed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dht import UID_DELIMITER, DHTUnavailableError, ExpertDirectory, ExpertReplica, GridPrefix, search_grid
from router_client import background
from router_client.replicas import PeerScores

logger = logging.getLogger(__name__)

PREFETCH_ROWS = 1024
"""How many rows under the grid's root the index reads ahead in the background, once the root is known."""


@dataclass(frozen=True)
class _Entry:
    grid: GridPrefix
    fetched_at: float
    rows: np.ndarray  # last level: the grid rows of the uids it lists (rows match grid.coords); else empty
    endpoints: frozenset[str]  # last level: the endpoints of their replicas


class GridIndex:
    """Live experts of one grid (`name`, `grid_size`), found per token by beam search over cached prefix records.

    Experts are addressed by their *row*, the index of their coordinates in the flattened grid (row-major), so
    that every per-call structure is an array and nothing is listed. `search` runs `dht.search_grid` from the
    caller's thread: prefixes in the cache answer at once, missing ones are fetched on the router's loop (one
    round trip per level, within the caller's deadline), stale ones are refreshed in the background.

    Live-aware: with a set of unusable endpoints (banned, dead), the search only walks coordinates that lead to
    an expert with a usable replica (inner levels judge by the peer ids in the prefix records), so a token's
    candidates are experts that can answer. Every fetched last-level record is shown to `scores`
    (`PeerScores.observe`, which revives dead replicas that announced a newer record), and while a cached prefix
    lists a dead replica it is re-read every `recheck` seconds (if sooner than `ttl`). Once the root is known, the
    rows below it that no forward needed yet are read ahead in the background. With `trusted_peers`
    (peer ids), records of every other peer are ignored. The index is written on the router's loop and read from
    any thread; readers only look entries up.
    """

    def __init__(
        self,
        directory: ExpertDirectory,
        name: str,
        grid_size: tuple[int, ...],
        *,
        ttl: float = 5.0,
        trusted_peers: frozenset[str] | None = None,
        scores: PeerScores | None = None,
        recheck: float = 1.0,
    ):
        self.directory, self.name, self.grid_size = directory, name, tuple(grid_size)
        self.ttl, self.trusted_peers, self.scores, self.recheck = ttl, trusted_peers, scores, recheck
        self.num_dims = len(self.grid_size)
        self.num_rows = math.prod(self.grid_size)
        self.strides = [math.prod(self.grid_size[d + 1 :]) for d in range(self.num_dims)]
        self.lookups = {"waited": 0, "refreshed": 0, "failed": 0}  # fetches a forward waited for / ran behind it
        self._entries: dict[str, _Entry] = {}
        self._replicas: dict[int, list[ExpertReplica]] = {}  # row -> replicas, for every cached last-level uid
        self._uids: dict[int, str] = {}  # row -> uid, for the same rows
        self._row_of: dict[str, int] = {}  # uid -> row, for the uids asked about lately
        self._rows_at: dict[str, set[int]] = {}  # endpoint -> rows it serves
        self._peer_at: dict[str, str] = {}  # endpoint -> peer id
        self._refreshing: set[str] = set()
        self._usable_memo: tuple[frozenset[str], int, np.ndarray] | None = None
        self._filtered: dict[str, tuple[frozenset[str], np.ndarray]] = {}
        self._version = 0

    # ------------------------------------------------------------------ routing

    def search(
        self, grid_scores: list[torch.Tensor], k: int, beam_size: int, unusable: frozenset[str], deadline: float
    ) -> torch.Tensor:
        """Rows of each token's `k` best experts, best first: ``[tokens, k]`` int64, -1 where it has fewer.

        ``grid_scores[d]`` are the (detached) scores of grid dimension d, ``[tokens, grid_size[d]]``. With
        `unusable` endpoints, only experts with a replica elsewhere are candidates.
        """
        search = search_grid(self.name, grid_scores, k, beam_size)
        unusable_peers = frozenset(self._peer_at[e] for e in unusable if e in self._peer_at)
        try:
            prefixes = next(search)
            while True:
                prefixes = search.send(self._coordinates(prefixes, unusable, unusable_peers, deadline))
        except StopIteration as stop:
            coords, _scores = stop.value
        rows = (coords * torch.tensor(self.strides, dtype=torch.int64)).sum(dim=-1)
        return rows.masked_fill_(coords[..., 0] < 0, -1)

    def coordinates_of(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per grid dimension, the coordinate of each row (same shape as `rows`; rows must be >= 0)."""
        pairs = zip(self.strides, self.grid_size, strict=True)
        return [rows.div(stride, rounding_mode="floor").remainder(size) for stride, size in pairs]

    def uid(self, row: int) -> str:
        """The uid of the expert at `row`."""
        known = self._uids.get(row)
        if known is not None:
            return known
        coords = [(row // stride) % size for stride, size in zip(self.strides, self.grid_size, strict=True)]
        return UID_DELIMITER.join([self.name, *map(str, coords)])

    def row(self, uid: str) -> int:
        """The row of `uid` (which must belong to this grid)."""
        row = self._row_of.get(uid)
        if row is None:
            coords = [int(part) for part in uid.split(UID_DELIMITER)[1:]]
            row = sum(c * stride for c, stride in zip(coords, self.strides, strict=True))
            if len(self._row_of) >= _ROW_CACHE_SIZE:
                self._row_of.clear()
            self._row_of[uid] = row
        return row

    def replicas_of(self, uid: str) -> list[ExpertReplica]:
        """The cached replicas of `uid` ([] when none is known)."""
        return self._replicas.get(self.row(uid), [])

    @property
    def replicas(self) -> Mapping[str, list[ExpertReplica]]:
        """uid -> cached replicas, as a read-only mapping (what the dispatcher looks replicas up in)."""
        return _ReplicaLookup(self)

    @property
    def num_known(self) -> int:
        """How many experts the cached last-level records list."""
        return len(self._replicas)

    def usable(self, unusable_endpoints: Iterable[str]) -> np.ndarray:
        """Per row (a bool array over the whole grid), whether no known replica is unusable or one is usable.

        Rows of experts that are not known are True: the search never offers them.
        """
        unusable = frozenset(unusable_endpoints)
        memo = self._usable_memo
        if memo is not None and memo[0] == unusable and memo[1] == self._version:
            return memo[2]
        mask = np.ones(self.num_rows, dtype=bool)
        affected = {row for endpoint in unusable for row in self._rows_at.get(endpoint, ())}
        for row in affected:
            mask[row] = any(r.endpoint not in unusable for r in self._replicas.get(row, ()))
        self._usable_memo = (unusable, self._version, mask)
        return mask

    def endpoints(self) -> set[str]:
        """Every endpoint the cached records list."""
        return set(list(self._rows_at))  # list() copies in one step: the loop's thread may be writing

    # ------------------------------------------------------------------ the cache

    def _coordinates(
        self, prefixes: list[str], unusable: frozenset[str], unusable_peers: frozenset[str], deadline: float
    ) -> dict[str, np.ndarray]:
        entries = self._entries
        missing = [p for p in prefixes if p not in entries or (not len(entries[p].grid.coords) and p == self._root)]
        if missing:
            self._wait_for(missing, deadline)
        now, found, stale = time.monotonic(), {}, []
        dead = self.scores.dead_endpoints() if self.scores is not None else set()
        for prefix in prefixes:
            entry = entries.get(prefix)
            if entry is None:
                continue
            max_age = self.ttl
            if not len(entry.grid.coords) or (dead and not dead.isdisjoint(entry.endpoints)):
                max_age = min(self.ttl, self.recheck)
            if now - entry.fetched_at > max_age and prefix not in self._refreshing:
                stale.append(prefix)
            found[prefix] = self._usable_coordinates(entry, unusable, unusable_peers) if unusable else entry.grid.coords
        if stale:
            self._refreshing.update(stale)
            background.get_loop().call_soon_threadsafe(self._start_refresh, stale)
        return found

    @property
    def _root(self) -> str:
        return self.name + UID_DELIMITER

    def _usable_coordinates(
        self, entry: _Entry, unusable: frozenset[str], unusable_peers: frozenset[str]
    ) -> np.ndarray:
        grid = entry.grid
        if grid.is_last:
            if unusable.isdisjoint(entry.endpoints):
                return grid.coords
        elif unusable_peers.isdisjoint(peer for peers in grid.hosts.values() for peer in peers):
            return grid.coords
        memo = self._filtered.get(grid.prefix)
        if memo is not None and memo[0] == unusable:
            return memo[1]
        if grid.is_last:
            keep = [c for c in grid.coords.tolist() if any(r.endpoint not in unusable for r in grid.replicas[c])]
        else:
            keep = [c for c in grid.coords.tolist() if not grid.hosts[c] <= unusable_peers]
        coords = np.array(keep, dtype=np.int64)
        self._filtered[grid.prefix] = (unusable, coords)
        return coords

    def _wait_for(self, prefixes: list[str], deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        self.lookups["waited"] += 1
        try:
            background.run(self._fetch(prefixes, remaining, latest=False), timeout=remaining + 1.0)
        except TimeoutError:
            logger.warning("the DHT did not answer for %d prefixes of %r in time", len(prefixes), self.name)

    def _start_refresh(self, prefixes: list[str]) -> None:
        """On the router's loop: fetch these stale prefixes again, together, behind the callers' backs."""
        task = asyncio.ensure_future(self._fetch(prefixes, max(self.ttl, 10.0)))
        task.add_done_callback(lambda _: self._refreshing.difference_update(prefixes))
        self.lookups["refreshed"] += 1

    async def _fetch(self, prefixes: list[str], timeout: float, *, latest: bool = True) -> None:
        """Read `prefixes` and store what they say. A forward that waits takes the DHT's first copies
        (``latest=False``: faster) and back-dates them, so the background refresh soon completes them."""
        fetched_at = time.monotonic()
        try:
            grids = await self.directory.read_grid_prefixes(
                prefixes, self.num_dims, use_cache=False, latest=latest, timeout=timeout, return_future=True
            )
        except (DHTUnavailableError, TimeoutError, OSError) as exc:
            self.lookups["failed"] += 1
            shut_down = "shut down" in str(exc)  # the client is closing: nothing to tell
            log = logger.debug if shut_down else logger.warning
            log("could not read %d prefixes of %r from the DHT: %s", len(prefixes), self.name, exc)
            return
        if not latest:
            fetched_at -= max(0.0, self.ttl - self.recheck)  # re-read with `latest` within `recheck` seconds
        for grid in grids.values():
            self._store(self._trusted(grid), fetched_at)
        root = grids.get(self._root)
        if root is not None and not root.is_last:
            self._prefetch([f"{self._root}{c}{UID_DELIMITER}" for c in self._entries[self._root].grid.coords.tolist()])

    def _prefetch(self, prefixes: list[str]) -> None:
        """On the router's loop: read the rows under the root that no forward has needed yet, in the background,
        so that a later batch whose beams reach them does not wait for the DHT (at most `PREFETCH_ROWS`)."""
        wanted = [p for p in prefixes if p not in self._entries and p not in self._refreshing][:PREFETCH_ROWS]
        if wanted:
            self._refreshing.update(wanted)
            self._start_refresh(wanted)

    def _trusted(self, grid: GridPrefix) -> GridPrefix:
        trusted = self.trusted_peers
        if trusted is None:
            return grid
        hosts = {c: peers & trusted for c, peers in grid.hosts.items() if peers & trusted}
        replicas = {c: [r for r in rs if r.peer_id in trusted] for c, rs in grid.replicas.items()}
        replicas = {c: rs for c, rs in replicas.items() if rs}
        coords = sorted(replicas if grid.is_last else hosts)
        return GridPrefix(grid.prefix, grid.num_dims, np.array(coords, dtype=np.int64), hosts, replicas)

    def _store(self, grid: GridPrefix, fetched_at: float) -> None:
        """On the router's loop: replace one prefix's entry (and, at the last level, its experts' replicas).

        New replicas are written before the ones that are gone are dropped, so a reader never misses an expert
        that stays.
        """
        rows = np.zeros(0, dtype=np.int64)
        endpoints: frozenset[str] = frozenset()
        if grid.is_last:
            coords = grid.coords[grid.coords < self.grid_size[-1]]
            rows = self.row(grid.prefix + "0") + coords
            replicas = dict(zip(rows.tolist(), (grid.replicas[c] for c in coords.tolist()), strict=True))
            endpoints = frozenset(r.endpoint for rs in replicas.values() for r in rs)
            if self.scores is not None:
                revived = self.scores.observe(r for rs in replicas.values() for r in rs)
                if revived:
                    logger.info("replicas at %s announced themselves again; routing to them", ", ".join(revived))
            old = self._entries.get(grid.prefix)
            before = {row: self._replicas.get(row, []) for row in old.rows.tolist()} if old is not None else {}
            for row, row_replicas in replicas.items():
                self._replicas[row] = row_replicas
                self._uids[row] = row_replicas[0].uid
                for replica in row_replicas:
                    self._rows_at.setdefault(replica.endpoint, set()).add(row)
                    self._peer_at[replica.endpoint] = replica.peer_id
            for row, row_replicas in before.items():
                staying = {r.endpoint for r in replicas.get(row, ())}
                for replica in row_replicas:
                    if replica.endpoint not in staying:
                        self._unlink(replica.endpoint, row)
                if row not in replicas:
                    self._replicas.pop(row, None)
        self._entries[grid.prefix] = _Entry(grid, fetched_at, rows, endpoints)
        self._filtered.pop(grid.prefix, None)
        self._version += 1

    def _unlink(self, endpoint: str, row: int) -> None:
        rows_there = self._rows_at.get(endpoint)
        if rows_there is not None:
            rows_there.discard(row)
            if not rows_there:
                del self._rows_at[endpoint]


_ROW_CACHE_SIZE = 1 << 16
"""uids whose rows `GridIndex.row` remembers (it forgets them all when full): the experts of recent calls."""


class _ReplicaLookup(Mapping):
    """uid -> replicas of a `GridIndex`, looked up on demand."""

    def __init__(self, index: GridIndex):
        self.index = index

    def __getitem__(self, uid: str) -> list[ExpertReplica]:
        return self.index.replicas_of(uid)

    def get(self, uid: str, default=None):
        """The replicas of `uid`, or `default` when none is known."""
        return self.index.replicas_of(uid) or default

    def __iter__(self):
        return (self.index.uid(row) for row in list(self.index._replicas))  # list(): a copy in one step

    def __len__(self) -> int:
        return self.index.num_known

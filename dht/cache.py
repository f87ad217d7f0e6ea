"""A client-side TTL cache of DHT lookups, so that routing a batch usually costs no DHT round trip."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from hivemind.utils import get_dht_time

from dht.calls import RawRecords


@dataclass
class _Entry:
    fetched_at: float  # monotonic time of the lookup
    records: RawRecords  # sub-key -> (value, expiration_time in DHT time)


class RecordCache:
    """DHT key -> the sub-keyed records found for it, served for `ttl` seconds after they were fetched.

    * What: the result of one lookup of one key (expert uid or grid prefix), including "nothing found", so a
      missing expert or an empty grid prefix is not looked up again within the TTL either.
    * How long: `ttl` seconds since the lookup (monotonic clock), and never past a record's own
      ``expiration_time``: an expired record is dropped when served, even from a fresh entry.
    * Consequence: a replica declared (or gone) after a lookup shows up (or disappears) at most `ttl`
      seconds late, except for expiry, which is exact. ``ttl=0`` disables caching.

    Thread-safe. At most `max_keys` keys are kept; the oldest lookups are evicted first.
    """

    def __init__(self, ttl: float, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 0:
            raise ValueError(f"cache ttl must be >= 0, got {ttl}")
        self.ttl, self.max_keys, self._clock = ttl, max_keys, clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def lookup(self, keys: Iterable[str]) -> tuple[dict[str, RawRecords], list[str]]:
        """Split `keys` into fresh hits (key -> unexpired records) and misses (keys to fetch), keeping order."""
        hits: dict[str, RawRecords] = {}
        misses: list[str] = []
        now, dht_now = self._clock(), get_dht_time()
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and now - entry.fetched_at < self.ttl:
                    hits[key] = unexpired(entry.records, dht_now)
                else:
                    misses.append(key)
        return hits, misses

    def update(self, found: Mapping[str, RawRecords], fetched_at: float) -> None:
        """Remember lookup results; `fetched_at` is the clock time at which the lookup was sent."""
        if self.ttl == 0:
            return
        with self._lock:
            for key, records in found.items():
                self._entries.pop(key, None)  # re-insert, so that dict order is the order of lookups
                self._entries[key] = _Entry(fetched_at, dict(records))
            if len(self._entries) > self.max_keys:
                self._evict()

    def invalidate(self, keys: Iterable[str]) -> None:
        """Forget `keys` (e.g. after declaring them), so that the next lookup goes to the DHT."""
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        now = self._clock()
        for key in [key for key, entry in self._entries.items() if now - entry.fetched_at >= self.ttl]:
            del self._entries[key]
        while len(self._entries) > self.max_keys:
            del self._entries[next(iter(self._entries))]


def unexpired(records: RawRecords, now: float | None = None) -> RawRecords:
    """The records whose expiration_time is still in the future (DHT time)."""
    now = get_dht_time() if now is None else now
    return {subkey: item for subkey, item in records.items() if item[1] > now}

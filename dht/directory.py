"""`ExpertDirectory`: declare experts, find their replicas, and beam-search the best ones, through the DHT."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Generator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dht import calls
from dht.beam_search import beam_search
from dht.cache import RecordCache, unexpired
from dht.calls import RawRecords
from dht.grid import GridPrefix, parse_grid_prefix
from dht.node import DHTNode, DHTUnavailableError
from dht.records import (
    MAX_EXPIRATION_SECONDS,
    ExpertReplica,
    expert_subkey,
    grid_prefixes,
    make_expert_value,
    make_prefix_value,
    make_row_value,
    owner_marker,
    parse_subkey,
    prefix_subkey,
    withdrawn,
)
from dht.uids import UID_DELIMITER, grid_name, is_valid_grid_prefix, is_valid_uid, split_uid
from dht.validation import signing_owner_marker

logger = logging.getLogger(__name__)

# An operation yields the DHT keys it needs next and receives their (unexpired) records; see `_lookup_plan`.
Operation = Generator[list[str], Mapping[str, RawRecords], Any]
# A plan yields the calls it needs run in the DHT process, each with its timeout, and receives their results.
Plan = Generator[tuple[partial, float], Any, Any]


@dataclass
class DirectoryStats:
    """Counters of an `ExpertDirectory`: DHT round trips made and keys served from / missed in the cache."""

    dht_rounds: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class ExpertDirectory:
    """The expert records of a dmoe swarm, read and written through a `DHTNode` (layout: `dht.records`).

    * `declare` (peers): owner-signed grid-prefix records, the last-level one of each uid carrying its
      endpoint and load (layout: `dht.records`), all in one DHT round trip. Records expire after `expiration`
      seconds unless declared again; another peer can neither overwrite nor erase them.
    * `get` (clients): every live replica of each uid.
    * `find_best_experts` (routers): per query, the best `k` live uids of a grid for per-dimension scores.
      Batched: one DHT round trip per grid level for all queries together, and none on a cache hit.
    * `list_experts` (status): every live uid under a grid name with its replicas.

    Caching: lookups of uid keys and grid-prefix keys, including empty results, are kept `cache_ttl`
    seconds (see `RecordCache`): a replica appears or disappears at most `cache_ttl` seconds late, but an
    expired record is never served. `declare` drops the keys it wrote from the cache. Pass
    ``use_cache=False`` to go to the DHT regardless (the result still refreshes the cache).

    Every method has a `timeout` (default: the node's `call_timeout`) covering all of its DHT round trips,
    and raises `DHTUnavailableError` when the DHT cannot answer in time. With ``return_future=True`` each
    method returns an awaitable of the same result instead of blocking, for use from a running event loop.

    `rsa_key` must be the key the node signs with (``DHTNode(record_validators=make_record_validators(key))``);
    None takes the node's. A node without an `RSASignatureValidator` gives a read-only directory.
    """

    def __init__(self, node: DHTNode, *, rsa_key: RSAPrivateKey | None = None, cache_ttl: float = 5.0):
        self.node = node
        self._marker = signing_owner_marker(node.record_validators)
        if rsa_key is not None and owner_marker(rsa_key.get_public_key().to_bytes()) != self._marker:
            raise ValueError(
                "rsa_key is not the key that the DHT node signs records with: create the node with "
                "record_validators=make_record_validators(rsa_key)"
            )
        self.cache = RecordCache(cache_ttl)
        self.stats = DirectoryStats()
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ declare

    def declare(
        self,
        uids: Sequence[str],
        endpoint: str,
        *,
        expiration: float = 60.0,
        expert_cls: str = "",
        load: Mapping[str, Mapping] | None = None,
        timeout: float | None = None,
        return_future: bool = False,
    ) -> dict[str, bool] | Awaitable[dict[str, bool]]:
        """Announce that this peer serves `uids` at gRPC `endpoint` (``host:port``) for `expiration` seconds.

        `load` maps a uid to its figures ``{"queue_size": int, "tokens_per_second": float}`` (missing: zeros).
        Returns uid -> True if all its prefix records were stored by at least one DHT node.
        Raises ValueError for invalid uids, endpoint or figures, before touching the DHT (also with
        `return_future`).
        """
        request = self._declaration(uids, endpoint, expiration, expert_cls, load)
        return self._execute(self._declare_plan(request, timeout), return_future)

    def withdraw(
        self,
        uids: Sequence[str],
        endpoint: str,
        *,
        expiration: float = 60.0,
        timeout: float | None = None,
        return_future: bool = False,
    ) -> dict[str, bool] | Awaitable[dict[str, bool]]:
        """Mark this peer's records of `uids` (and their prefix records) withdrawn, so readers skip them at once.

        `expiration` must reach past the records' own expiry (a DHT node keeps the value that expires last);
        the announcement period's expiration does. Returns uid -> True where every record was overwritten.
        """
        request = self._declaration(uids, endpoint, expiration, "", None, withdraw=True)
        return self._execute(self._declare_plan(request, timeout), return_future)

    def _declare_plan(self, request: _Declaration | None, timeout: float | None) -> Plan:
        if request is None:
            return {}
        status = yield request.call, self._timeout(timeout)
        return self._declared(request, status)

    def _declaration(self, uids, endpoint, expiration, expert_cls, load, withdraw=False) -> _Declaration | None:
        if isinstance(uids, str):
            raise TypeError("uids must be a sequence of uids, not a single string")
        if self._marker is None:
            raise RuntimeError("this directory is read-only: its DHT node has no RSASignatureValidator to sign with")
        if not 0 < expiration <= MAX_EXPIRATION_SECONDS:
            raise ValueError(f"expiration must be in (0, {MAX_EXPIRATION_SECONDS:.0f}] seconds, got {expiration}")
        load = load or {}
        peer_id = self.node.peer_id
        records: dict[tuple[str, str], dict] = {}
        needs: dict[str, list[tuple[str, str]]] = {}
        rows: dict[str, list[str]] = {}  # last-level prefix -> this call's uids in that row
        for uid in dict.fromkeys(uids):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid expert uid {uid!r}: expected e.g. 'ffn.3' or 'ffn.3.17'")
            prefixes = grid_prefixes(uid)
            needs[uid] = []
            for prefix, coord in prefixes[:-1]:
                prefix_record = (prefix, prefix_subkey(coord, peer_id, self._marker))
                prefix_value = make_prefix_value(uid)
                records.setdefault(prefix_record, withdrawn(prefix_value) if withdraw else prefix_value)
                needs[uid].append(prefix_record)
            row = prefixes[-1][0]
            rows.setdefault(row, []).append(uid)
            needs[uid].append((row, expert_subkey(peer_id, self._marker)))
        for row, row_uids in rows.items():
            row_load = [load.get(uid) or {} for uid in row_uids]
            total = {
                "queue_size": sum(_figure(figures.get("queue_size")) for figures in row_load),
                "tokens_per_second": sum(_figure(figures.get("tokens_per_second")) for figures in row_load),
            }
            value = make_row_value(row_uids, make_expert_value(endpoint, peer_id, expert_cls, total))
            records[row, expert_subkey(peer_id, self._marker)] = withdrawn(value) if withdraw else value
        if not records:
            return None
        keys, subkeys = zip(*records, strict=True)
        call = partial(
            calls.store_records,
            keys=list(keys),
            subkeys=list(subkeys),
            values=list(records.values()),
            expiration_time=get_dht_time() + expiration,
        )
        return _Declaration(call, list(records), needs)

    def _declared(self, request: _Declaration, status: list[bool]) -> dict[str, bool]:
        self._count(rounds=1)
        self.cache.invalidate({key for key, _ in request.records})
        stored = dict(zip(request.records, status, strict=True))
        return {uid: all(stored[record] for record in records) for uid, records in request.needs.items()}

    # ------------------------------------------------------------------ lookups

    def get(
        self,
        uids: Sequence[str],
        *,
        use_cache: bool = True,
        timeout: float | None = None,
        return_future: bool = False,
    ) -> dict[str, list[ExpertReplica]] | Awaitable[dict[str, list[ExpertReplica]]]:
        """Every live replica of each uid (uid -> [] when none), ordered by peer id; see the class docstring."""
        return self._execute(self._lookup_plan(_get_operation(uids), use_cache, timeout), return_future)

    def find_best_experts(
        self,
        prefix: str,
        grid_scores: Sequence[np.ndarray],
        k: int,
        *,
        beam_size: int | None = None,
        use_cache: bool = True,
        timeout: float | None = None,
        return_future: bool = False,
    ) -> list[list[str]] | Awaitable[list[list[str]]]:
        """For each query, the `k` best live uids of grid `prefix` (``"ffn"``), best first.

        ``grid_scores[d]`` holds the scores of grid dimension ``d``, shape ``[num_queries, grid_size_d]`` (numpy
        or torch); a uid ``ffn.i.j`` scores ``grid_scores[0][q, i] + grid_scores[1][q, j]``. `beam_size`
        (default `k`) prefixes are kept per query and level; see `dht.beam_search.beam_search` for exactness.
        """
        operation = beam_search(grid_name(prefix), grid_scores, k, k if beam_size is None else beam_size)
        return self._execute(self._lookup_plan(operation, use_cache, timeout), return_future)

    def read_grid_prefixes(
        self,
        prefixes: Sequence[str],
        num_dims: int,
        *,
        use_cache: bool = True,
        latest: bool = True,
        timeout: float | None = None,
        return_future: bool = False,
    ) -> dict[str, GridPrefix] | Awaitable[dict[str, GridPrefix]]:
        """What each grid-prefix key (``"ffn."``, ``"ffn.3."``) says about the `num_dims`-d uids below it, in one
        DHT round trip for all of them (none on a cache hit): the building block of a router's own beam search.

        ``latest=False`` takes the first unexpired copy of each key the DHT finds instead of merging every
        node's: several times faster, but it may miss replicas declared since; for a first look that a later
        (latest) read completes.
        """
        operation = _prefix_operation(prefixes, num_dims)
        return self._execute(self._lookup_plan(operation, use_cache, timeout, latest=latest), return_future)

    def list_experts(
        self, prefix: str, *, use_cache: bool = True, timeout: float | None = None, return_future: bool = False
    ) -> dict[str, list[ExpertReplica]] | Awaitable[dict[str, list[ExpertReplica]]]:
        """Every live uid under grid `prefix` (``"ffn"``) with its replicas; one DHT round trip per grid level."""
        operation = _list_operation(grid_name(prefix))
        return self._execute(self._lookup_plan(operation, use_cache, timeout), return_future)

    # ------------------------------------------------------------------ drivers

    def _lookup_plan(self, operation: Operation, use_cache: bool, timeout: float | None, latest: bool = True) -> Plan:
        """Answer each key request of `operation` from the cache, asking the DHT (a yielded call) for the misses."""
        deadline = time.monotonic() + self._timeout(timeout)
        try:
            request = operation.send(None)
            while True:
                found, misses = self._from_cache(request, use_cache)
                if misses:
                    fetched_at = time.monotonic()
                    fetched = yield partial(calls.get_records, keys=misses, latest=latest), _remaining(deadline)
                    found.update(self._fetched(fetched, fetched_at))
                request = operation.send(found)
        except StopIteration as stop:
            return stop.value

    def _execute(self, plan: Plan, return_future: bool) -> Any:
        """Run `plan`, each DHT call it yields in the DHT process: blocking, or as an awaitable (`return_future`)."""
        if return_future:
            return self._execute_async(plan)
        try:
            call, timeout = next(plan)
            while True:
                call, timeout = plan.send(self.node.run(call, timeout=timeout))
        except StopIteration as stop:
            return stop.value

    async def _execute_async(self, plan: Plan) -> Any:
        try:
            call, timeout = next(plan)
            while True:
                call, timeout = plan.send(await self.node.arun(call, timeout=timeout))
        except StopIteration as stop:
            return stop.value

    def _from_cache(self, keys: list[str], use_cache: bool) -> tuple[dict[str, RawRecords], list[str]]:
        keys = list(dict.fromkeys(keys))
        found, misses = self.cache.lookup(keys) if use_cache else ({}, keys)
        self._count(hits=len(found), misses=len(misses))
        return found, misses

    def _fetched(self, fetched: Mapping[str, RawRecords], fetched_at: float) -> dict[str, RawRecords]:
        self._count(rounds=1)
        self.cache.update(fetched, fetched_at)
        now = get_dht_time()
        return {key: unexpired(records, now) for key, records in fetched.items()}

    def _timeout(self, timeout: float | None) -> float:
        return self.node.call_timeout if timeout is None else timeout

    def _count(self, *, rounds: int = 0, hits: int = 0, misses: int = 0) -> None:
        with self._stats_lock:
            self.stats.dht_rounds += rounds
            self.stats.cache_hits += hits
            self.stats.cache_misses += misses


@dataclass(frozen=True)
class _Declaration:
    call: partial  # the store call for the DHT process
    records: list[tuple[str, str]]  # (key, subkey) of every record, in the order of the call
    needs: dict[str, list[tuple[str, str]]]  # uid -> the records it needs


def _figure(value: object) -> float:
    """A load figure as a number (anything else counts as 0; `make_expert_value` clamps the sum)."""
    return float(value) if isinstance(value, int | float) and value == value else 0.0


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DHTUnavailableError("the DHT lookup ran out of time between round trips")
    return remaining


def _get_operation(uids: Sequence[str]) -> Operation:
    """Read the last-level prefix key of every uid (``ffn.3.`` for ``ffn.3.17``), whose records list the replicas."""
    if isinstance(uids, str):
        raise TypeError("uids must be a sequence of uids, not a single string")
    uids = list(dict.fromkeys(uids))
    for uid in uids:
        if not is_valid_uid(uid):
            raise ValueError(f"invalid expert uid {uid!r}: expected e.g. 'ffn.3' or 'ffn.3.17'")
    if not uids:
        return {}
    parents = {uid: uid.rsplit(UID_DELIMITER, 1)[0] + UID_DELIMITER for uid in uids}
    found = yield sorted(set(parents.values()))
    replicas = {}
    for uid in uids:
        coords = split_uid(uid)[1]
        grid = parse_grid_prefix(parents[uid], found.get(parents[uid], {}), len(coords))
        replicas[uid] = grid.replicas.get(coords[-1], [])
    return replicas


def _prefix_operation(prefixes: Sequence[str], num_dims: int) -> Operation:
    if isinstance(prefixes, str):
        raise TypeError("prefixes must be a sequence of grid prefixes, not a single string")
    prefixes = list(dict.fromkeys(prefixes))
    for prefix in prefixes:
        if not is_valid_grid_prefix(prefix) or prefix.count(UID_DELIMITER) > num_dims:
            raise ValueError(f"invalid grid prefix {prefix!r} for {num_dims}-d uids: expected e.g. 'ffn.' or 'ffn.3.'")
    if not prefixes:
        return {}
    found = yield prefixes
    return {prefix: parse_grid_prefix(prefix, found.get(prefix, {}), num_dims) for prefix in prefixes}


def _list_operation(name: str) -> Operation:
    """Walk the grid prefixes of `name` level by level; the last level's records list the replicas."""
    replicas: dict[str, list[ExpertReplica]] = {}
    level = [name + UID_DELIMITER]
    while level:
        found = yield level
        next_level: set[str] = set()
        for prefix in level:
            records = found.get(prefix, {})
            num_dims = _uid_dims(records)
            if num_dims is None:
                continue
            grid = parse_grid_prefix(prefix, records, num_dims)
            if grid.is_last:
                replicas.update({f"{prefix}{coord}": rs for coord, rs in grid.replicas.items()})
            else:
                next_level.update(f"{prefix}{coord}{UID_DELIMITER}" for coord in grid.coords.tolist())
        level = sorted(next_level)
    return {uid: replicas[uid] for uid in sorted(replicas)}


def _uid_dims(records: RawRecords) -> int | None:
    """How many coordinates the uids named by these prefix or row records have (one grid has one number), if any."""
    for subkey, (value, _expiration) in records.items():
        parsed = parse_subkey(subkey)
        if parsed is not None and isinstance(value, dict) and is_valid_uid(value.get("uid")):
            return len(split_uid(value["uid"])[1])
    return None

"""What one grid-prefix key of the DHT says about the experts below it (see `dht.records` for the layout)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dht.calls import RawRecords
from dht.records import (
    ExpertReplica,
    check_expert_value,
    check_prefix_value,
    check_row_value,
    is_withdrawn,
    parse_subkey,
)
from dht.uids import UID_DELIMITER, split_uid


@dataclass(frozen=True)
class GridPrefix:
    """The live next coordinates under one grid prefix (``"ffn."``, ``"ffn.3."``), for uids of `num_dims` coordinates.

    `coords` are sorted and distinct; `hosts[c]` holds the peer ids whose records lead through coordinate `c`.
    When the prefix is one coordinate short of a uid (`is_last`), `replicas[c]` are the replicas of uid
    ``prefix + c``, read from the peers' row records under it (one per peer id, sorted by peer id).
    """

    prefix: str
    num_dims: int
    coords: np.ndarray
    hosts: dict[int, frozenset[str]] = field(default_factory=dict)
    replicas: dict[int, list[ExpertReplica]] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """How many coordinates the prefix already has."""
        return self.prefix.count(UID_DELIMITER) - 1

    @property
    def is_last(self) -> bool:
        """Whether the next coordinate completes a uid."""
        return self.depth == self.num_dims - 1


def parse_grid_prefix(prefix: str, records: RawRecords, num_dims: int) -> GridPrefix:
    """Read the (unexpired) records of key `prefix` into a `GridPrefix`; malformed and withdrawn ones are skipped."""
    depth = prefix.count(UID_DELIMITER) - 1
    last = depth == num_dims - 1
    hosts: dict[int, set[str]] = {}
    replicas: dict[int, dict[str, ExpertReplica]] = {}
    for subkey, (value, expiration_time) in records.items():
        parsed = parse_subkey(subkey)
        if parsed is None or is_withdrawn(value):
            continue
        if parsed.coord is None:  # a row record: one peer's experts of this row
            if not last or check_expert_value(value, parsed.peer_id) or check_row_value(value):
                continue
            if value["uid"].rsplit(UID_DELIMITER, 1)[0] + UID_DELIMITER != prefix:
                continue
            if len(split_uid(value["uid"])[1]) != num_dims:
                continue
            for coord in value["coords"]:
                replica = ExpertReplica(
                    uid=f"{prefix}{coord}",
                    endpoint=value["endpoint"],
                    peer_id=value["peer_id"],
                    expiration_time=float(expiration_time),
                    expert_cls=value["expert_cls"],
                    queue_size=value["load"]["queue_size"],
                    tokens_per_second=value["load"]["tokens_per_second"],
                )
                known = replicas.setdefault(coord, {}).get(replica.peer_id)
                if known is None or known.expiration_time < replica.expiration_time:
                    replicas[coord][replica.peer_id] = replica
                hosts.setdefault(coord, set()).add(parsed.peer_id)
            continue
        if last or check_prefix_value(value, parsed.coord) is not None:
            continue
        if len(split_uid(value["uid"])[1]) == num_dims:
            hosts.setdefault(parsed.coord, set()).add(parsed.peer_id)
    return GridPrefix(
        prefix,
        num_dims,
        np.array(sorted(hosts), dtype=np.int64),
        {coord: frozenset(peers) for coord, peers in hosts.items()},
        {coord: [by_peer[p] for p in sorted(by_peer)] for coord, by_peer in replicas.items()},
    )

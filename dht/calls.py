"""Coroutines that run inside the DHT process (passed to `DHTNode.run`).

They are module-level functions, bound with `functools.partial`, because `DHTNode.run` pickles them into the
DHT process. They take and return plain Python values (no hivemind types), keeping the messages small: the
scoring, caching and parsing all happen in the caller's process.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import Sequence

from hivemind.utils import ValueWithExpiration

# What `get_records` returns for one key: sub-key -> (value, expiration_time); {} when nothing was found.
RawRecords = dict[str, tuple[object, float]]


async def call_with_deadline(dht, node, coro_fn, timeout: float) -> tuple[str, object]:
    """Run ``coro_fn(dht, node)`` for at most `timeout` seconds and report the outcome as a tagged tuple.

    ``("ok", result)``, ``("timeout", None)`` or ``("error", exception)``: nothing is raised, and an abandoned
    call does not keep running in the DHT process.
    """
    try:
        return "ok", await asyncio.wait_for(coro_fn(dht, node), timeout)
    except TimeoutError:
        return "timeout", None
    except Exception as exc:
        return "error", picklable(exc)


def picklable(exc: Exception) -> Exception:
    """`exc` itself if it survives pickling (to cross the process boundary), else a RuntimeError describing it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


async def ping(dht, node) -> int:
    """The DHT process id; proves that the process answers."""
    return os.getpid()


async def describe(dht, node) -> tuple[str, list[str]]:
    """(peer id in base58, visible multiaddrs ending with /p2p/<peer id>)."""
    maddrs = await node.get_visible_maddrs()
    return node.peer_id.to_base58(), [str(maddr) for maddr in maddrs]


async def get_records(dht, node, keys: Sequence[str], latest: bool = True) -> dict[str, RawRecords]:
    """Fetch the dictionary records of `keys`, merged across all the DHT nodes that store them.

    With `latest` (the default), ``sufficient_expiration_time=inf`` (hivemind's ``latest=True``): a plain get
    stops at the first unexpired copy it finds, often the local cache, and could miss replicas that other peers
    declared since; it is faster, for a first look that a later latest read completes. Keys holding no dictionary
    map to {}.
    """
    sufficient = float("inf") if latest else None
    found = await node.get_many(list(keys), sufficient_expiration_time=sufficient)
    records: dict[str, RawRecords] = {}
    for key in keys:
        item = found.get(key)
        records[key] = {}
        if item is None or not isinstance(item.value, dict):
            continue
        for subkey, entry in item.value.items():
            if isinstance(subkey, str) and isinstance(entry, ValueWithExpiration):
                records[key][subkey] = (entry.value, entry.expiration_time)
    return records


async def store_records(
    dht, node, keys: Sequence[str], subkeys: Sequence[str], values: Sequence[object], expiration_time: float
) -> list[bool]:
    """Store ``values[i]`` under ``(keys[i], subkeys[i])`` until `expiration_time`; one bool per record.

    True means at least one DHT node accepted the record (hivemind signs it with the node's RSA key on the way).
    """
    status = await node.store_many(list(keys), list(values), expiration_time, subkeys=list(subkeys))
    return [bool(status.get((key, subkey))) for key, subkey in zip(keys, subkeys, strict=True)]

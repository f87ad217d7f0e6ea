"""Key layout and value format of dmoe's DHT records (what `ExpertDirectory` writes and reads).

Every dmoe record is one sub-key of a DHT dictionary key, and every sub-key carries the RSA owner marker
``[owner:<ssh-rsa public key>]`` of the peer that wrote it, so only that peer can change it (see
`dht.validation`). Declaring ``ffn.3.0`` … ``ffn.3.63`` from peer ``P`` stores::

    key "ffn."      subkey "3:P[owner:…]"   value {"uid": "ffn.3.0"}                 (prefix record)
    key "ffn.3."    subkey "P[owner:…]"     value {"uid": "ffn.3.0",                 (row record: P's
                                                   "coords": [0, 1, …, 63],          experts in row 3)
                                                   "endpoint": "10.0.0.5:31337", "peer_id": "P",
                                                   "expert_cls": "ffn",
                                                   "load": {"queue_size": 0, "tokens_per_second": 812.5}}

* Prefix records: the key of every proper grid prefix but the last (``"ffn."`` for 2-d uids) lists the next
  coordinates that lead to live experts, one sub-key per (coordinate, owner). Their value names one uid below.
* Row records: the last-level prefix key (one coordinate short of the uids, ``"ffn.3."``) holds one record per
  peer: the coordinates of every expert of that row the peer hosts, with its endpoint and load (the peer's, for
  the whole row). A beam search reads the replicas of the uids it picks from the same keys that list them, and a
  peer hosting a row of 64 experts writes one record for them, not 64: what a reader verifies, parses and
  re-reads grows with rows and peers, not with experts. A declaration replaces the peer's whole record of each
  row it names, so a peer declares all of a row's experts together (the announcer declares everything at once).
* Replicas: several peers hosting one uid write their own row records (sub-keys ``P[owner:…]``,
  ``Q[owner:…]``) of the same key; each has its own expiration, so each replica lives and dies on its own.
* All uids under one grid name must have the same number of coordinates (``ffn.3`` and ``ffn.3.17`` cannot
  coexist).
* Withdrawal: a DHT node keeps, per sub-key, the value with the latest expiration, so a record cannot be
  shortened or erased. A peer that stops cleanly overwrites its records with the same values plus
  ``"withdrawn": true`` (and a later expiration); readers skip withdrawn records, and the peer's next
  declaration, later still, replaces them again.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from dht.libp2p import check_libp2p_endpoint, is_libp2p_endpoint
from dht.uids import UID_DELIMITER, is_valid_uid, split_uid

MAX_VALUE_BYTES = 16384  # a serialized record value, before its signature (a row of a few thousand experts)
MAX_ROW_COORDS = 4096  # coordinates one row record may list
MAX_SUBKEY_CHARS = 1024
MAX_EXPIRATION_SECONDS = 24 * 3600.0  # honest nodes refuse records that claim to live longer than this
MAX_ENDPOINT_CHARS = 512  # a hostname and port, or a relayed libp2p multiaddr (two peer ids)
MAX_EXPERT_CLS_CHARS = 128
MAX_QUEUE_SIZE = 2**31 - 1
MAX_TOKENS_PER_SECOND = 1e12

_BASE58 = "1-9A-HJ-NP-Za-km-z"
_SUBKEY_RE = re.compile(rf"(?:(0|[1-9][0-9]{{0,9}}):)?([{_BASE58}]{{1,128}})(\[owner:[^\]]{{1,900}}\])")
_PEER_ID_RE = re.compile(rf"[{_BASE58}]{{1,128}}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")

EXPERT_FIELDS = ("endpoint", "peer_id", "expert_cls", "load")
LOAD_FIELDS = ("queue_size", "tokens_per_second")
WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class ExpertReplica:
    """One peer's announcement that it serves expert `uid` at gRPC `endpoint`, valid until `expiration_time`.

    `expiration_time` is in DHT time (`hivemind.utils.get_dht_time()`, i.e. Unix time). The load figures are
    those the peer reported when it last declared the expert.
    """

    uid: str
    endpoint: str
    peer_id: str
    expiration_time: float
    expert_cls: str = ""
    queue_size: int = 0
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class Subkey:
    """A parsed record sub-key: ``coord`` is None for expert records and an int for prefix records."""

    coord: int | None
    peer_id: str
    owner: str


def owner_marker(public_key: bytes) -> str:
    """The ``[owner:…]`` marker for an OpenSSH-encoded RSA public key (`RSAPublicKey.to_bytes()`)."""
    return f"[owner:{public_key.decode('ascii')}]"


def expert_subkey(peer_id: str, marker: str) -> str:
    """Sub-key of the expert record that `peer_id` (signing with `marker`) writes under a uid key."""
    return f"{peer_id}{marker}"


def prefix_subkey(coord: int, peer_id: str, marker: str) -> str:
    """Sub-key of the prefix record that says `peer_id` hosts an expert whose next coordinate is `coord`."""
    return f"{coord}:{peer_id}{marker}"


def parse_subkey(subkey: object) -> Subkey | None:
    """Parse a sub-key written by `expert_subkey` or `prefix_subkey`; None if it has another shape."""
    if not isinstance(subkey, str) or len(subkey) > MAX_SUBKEY_CHARS:
        return None
    match = _SUBKEY_RE.fullmatch(subkey)
    if match is None:
        return None
    coord, peer_id, owner = match.groups()
    return Subkey(None if coord is None else int(coord), peer_id, owner)


def grid_prefixes(uid: str) -> list[tuple[str, int]]:
    """Every proper grid prefix of `uid` with the coordinate that follows it.

    ``grid_prefixes("ffn.3.17") == [("ffn.", 3), ("ffn.3.", 17)]``.
    """
    name, coords = split_uid(uid)
    prefixes, prefix = [], name + UID_DELIMITER
    for coord in coords:
        prefixes.append((prefix, coord))
        prefix = f"{prefix}{coord}{UID_DELIMITER}"
    return prefixes


def make_expert_value(
    endpoint: str, peer_id: str, expert_cls: str = "", load: Mapping[str, object] | None = None
) -> dict:
    """Build the value of an expert record; raises ValueError if it would be rejected by `check_expert_value`.

    The load figures are advisory, so they are coerced rather than refused: missing, negative or non-finite
    figures become 0 and huge ones are capped.
    """
    load = load or {}
    value = {
        "endpoint": endpoint,
        "peer_id": peer_id,
        "expert_cls": expert_cls,
        "load": {
            "queue_size": int(_clamp(load.get("queue_size", 0), MAX_QUEUE_SIZE)),
            "tokens_per_second": float(_clamp(load.get("tokens_per_second", 0.0), MAX_TOKENS_PER_SECOND)),
        },
    }
    error = check_expert_value(value, peer_id)
    if error is not None:
        raise ValueError(f"invalid expert record: {error}")
    return value


def _clamp(figure: object, upper: float) -> float:
    try:
        figure = float(figure)
    except (TypeError, ValueError):
        return 0.0
    return min(figure, upper) if figure > 0 else 0.0  # NaN > 0 is False


def make_prefix_value(uid: str) -> dict:
    """Build the value of a prefix record (an example uid below that prefix)."""
    return {"uid": uid}


def make_row_value(uids: list[str], expert_value: Mapping[str, object]) -> dict:
    """Build the value of a row record: one peer's experts `uids` of one row (their last coordinates), with the
    fields of `expert_value` (from `make_expert_value`)."""
    coords = sorted({split_uid(uid)[1][-1] for uid in uids})
    return {"uid": uids[0], "coords": coords, **expert_value}


def withdrawn(value: dict) -> dict:
    """The record `value` marked as withdrawn (see the module docstring)."""
    return {**value, WITHDRAWN: True}


def is_withdrawn(value: object) -> bool:
    """Whether a record value was withdrawn by its owner."""
    return isinstance(value, dict) and value.get(WITHDRAWN) is True


def check_endpoint(endpoint: object) -> str | None:
    """None if `endpoint` is ``host:port`` (hostname, IPv4 or ``[IPv6]``; port 1-65535) or a libp2p multiaddr
    ending with the peer's id (`dht.libp2p`: a peer reached through a relay), else the reason."""
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT_CHARS:
        return f"endpoint must be a 'host:port' string or a libp2p multiaddr, got {endpoint!r:.80}"
    if is_libp2p_endpoint(endpoint):
        return check_libp2p_endpoint(endpoint)
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"endpoint {endpoint!r} must end with ':<port>' and a port in 1..65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"endpoint {endpoint!r} has an invalid IPv6 address"
        return None
    if _HOSTNAME_RE.fullmatch(host) is None:
        return f"endpoint {endpoint!r} has an invalid host (use a hostname, an IPv4 address or [IPv6])"
    return None


def check_expert_value(value: object, peer_id: str | None = None) -> str | None:
    """None if `value` is a well-formed expert record (written by `peer_id`, if given), else the reason.

    Unknown extra fields are allowed (newer peers may add some); the known ones must have exact types.
    """
    if not isinstance(value, dict):
        return f"expert record must be a map, got {type(value).__name__}"
    missing = [field for field in EXPERT_FIELDS if field not in value]
    if missing:
        return f"expert record lacks {missing}"
    if not all(isinstance(key, str) for key in value):
        return "expert record keys must be strings"
    error = check_endpoint(value["endpoint"])
    if error is not None:
        return error
    if not isinstance(value["peer_id"], str) or _PEER_ID_RE.fullmatch(value["peer_id"]) is None:
        return f"peer_id must be a base58 string, got {value['peer_id']!r:.80}"
    if peer_id is not None and value["peer_id"] != peer_id:
        return f"peer_id {value['peer_id']!r} differs from the sub-key's {peer_id!r}"
    if not isinstance(value["expert_cls"], str) or len(value["expert_cls"]) > MAX_EXPERT_CLS_CHARS:
        return f"expert_cls must be a string of at most {MAX_EXPERT_CLS_CHARS} characters"
    load = value["load"]
    if not isinstance(load, dict) or any(field not in load for field in LOAD_FIELDS):
        return f"load must be a map with {list(LOAD_FIELDS)}"
    queue_size, tokens_per_second = load["queue_size"], load["tokens_per_second"]
    if type(queue_size) is not int or not 0 <= queue_size <= MAX_QUEUE_SIZE:
        return f"load.queue_size must be an int in [0, {MAX_QUEUE_SIZE}], got {queue_size!r:.40}"
    if type(tokens_per_second) is not float or not (
        math.isfinite(tokens_per_second) and 0.0 <= tokens_per_second <= MAX_TOKENS_PER_SECOND
    ):
        return f"load.tokens_per_second must be a finite float >= 0, got {tokens_per_second!r:.40}"
    return None


def check_prefix_value(value: object, coord: int) -> str | None:
    """None if `value` is a well-formed prefix record for next coordinate `coord`, else the reason."""
    if not isinstance(value, dict) or "uid" not in value:
        return "prefix record must be a map with a 'uid'"
    uid = value["uid"]
    if not is_valid_uid(uid):
        return f"prefix record names an invalid uid {uid!r:.80}"
    if coord not in split_uid(uid)[1]:
        return f"prefix record for coordinate {coord} names {uid!r}, which lacks that coordinate"
    return None


def check_record(subkey: object, value: object) -> str | None:
    """None if (`subkey`, `value`) is a well-formed dmoe record of either kind, else the reason."""
    parsed = parse_subkey(subkey)
    if parsed is None:
        return f"sub-key {subkey!r:.80} is not '<peer_id>[owner:…]' or '<coord>:<peer_id>[owner:…]'"
    if parsed.coord is None:
        error = check_expert_value(value, parsed.peer_id)
        if error is None and "coords" in value:
            error = check_row_value(value)
        return error
    return check_prefix_value(value, parsed.coord)


def check_row_value(value: dict) -> str | None:
    """None if the row fields of an expert value (`coords`, and the example `uid` among them) are well-formed."""
    coords, uid = value.get("coords"), value.get("uid")
    if not isinstance(coords, list) or not 0 < len(coords) <= MAX_ROW_COORDS:
        return f"row record coords must be a list of 1 to {MAX_ROW_COORDS} coordinates"
    if any(type(c) is not int or c < 0 for c in coords) or len(set(coords)) != len(coords):
        return "row record coords must be distinct non-negative ints"
    if not is_valid_uid(uid) or split_uid(uid)[1][-1] not in coords:
        return f"row record names {uid!r:.80}, which is not one of its coordinates"
    return None

"""Expert uids: a name prefix followed by grid coordinates, e.g. ``ffn.3`` or ``ffn.3.17``.

A uid names one cell of an expert grid. The prefix (letters, digits, ``_`` and ``-``) names the grid; the
coordinates are non-negative integers written without leading zeros, so every expert has exactly one uid.
Grid prefixes in the DHT end with the delimiter (``ffn.``, ``ffn.3.``); see `dht.records`.
"""

from __future__ import annotations

import itertools
import re

UID_DELIMITER = "."
MAX_UID_LENGTH = 256
MAX_PATTERN_EXPANSION = 1_000_000

_NAME = r"[A-Za-z0-9_-]+"
_COORD = r"(?:0|[1-9][0-9]*)"
_UID_RE = re.compile(rf"{_NAME}(?:\.{_COORD})+")
_GRID_PREFIX_RE = re.compile(rf"{_NAME}(?:\.{_COORD})*\.")
_NAME_RE = re.compile(_NAME)
_RANGE_RE = re.compile(r"\[\s*(\d+)\s*:\s*(\d+)\s*\]")


def is_valid_uid(uid: object) -> bool:
    """True if `uid` is a string like ``ffn.3`` or ``ffn.3.17`` (a name, then one or more coordinates)."""
    return isinstance(uid, str) and len(uid) <= MAX_UID_LENGTH and _UID_RE.fullmatch(uid) is not None


def is_valid_grid_prefix(prefix: object) -> bool:
    """True if `prefix` is a DHT grid prefix: a name, zero or more coordinates, and a trailing delimiter."""
    return isinstance(prefix, str) and len(prefix) <= MAX_UID_LENGTH and _GRID_PREFIX_RE.fullmatch(prefix) is not None


def split_uid(uid: str) -> tuple[str, tuple[int, ...]]:
    """Split ``"ffn.3.17"`` into ``("ffn", (3, 17))``; raises ValueError for an invalid uid."""
    if not is_valid_uid(uid):
        raise ValueError(f"invalid expert uid {uid!r}: expected a name and coordinates, e.g. 'ffn.3' or 'ffn.3.17'")
    name, *coords = uid.split(UID_DELIMITER)
    return name, tuple(int(coord) for coord in coords)


def make_uid(name: str, coords: tuple[int, ...] | list[int]) -> str:
    """The inverse of `split_uid`: ``make_uid("ffn", (3, 17)) == "ffn.3.17"``."""
    uid = UID_DELIMITER.join([name, *map(str, coords)])
    if not is_valid_uid(uid):
        raise ValueError(f"cannot make an expert uid from {name!r} and {coords!r}")
    return uid


def grid_name(prefix: str) -> str:
    """Normalise a grid name given as ``"ffn"`` or ``"ffn."`` to ``"ffn"``; raises ValueError otherwise."""
    name = prefix[:-1] if prefix.endswith(UID_DELIMITER) else prefix
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ValueError(f"invalid expert prefix {prefix!r}: use letters, digits, '_' or '-', e.g. 'ffn'")
    return name


def parse_expert_pattern(pattern: str) -> list[str]:
    """Expand an expert pattern into uids, in order and without duplicates.

    A pattern is a comma-separated list of items; each item is a uid whose coordinates may be half-open
    ranges ``[a:b]`` (``a <= i < b``). Examples::

        "ffn.[0:4]"         -> ffn.0 ffn.1 ffn.2 ffn.3
        "ffn.[0:2].[5:7]"   -> ffn.0.5 ffn.0.6 ffn.1.5 ffn.1.6
        "ffn.0,ffn.1,ffn.7" -> ffn.0 ffn.1 ffn.7

    Raises ValueError with the offending item for anything else (empty items, bad names, negative or
    non-integer coordinates, empty ranges, more than a million uids).
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"empty expert pattern {pattern!r}: expected e.g. 'ffn.[0:4]' or 'ffn.0,ffn.1'")
    uids: dict[str, None] = {}
    for item in _split_items(pattern):
        name, *coord_specs = item.split(UID_DELIMITER)
        if _NAME_RE.fullmatch(name) is None or not coord_specs:
            raise ValueError(
                f"bad expert pattern item {item!r}: expected a name (letters, digits, '_', '-') and at least one"
                " coordinate, e.g. 'ffn.3' or 'ffn.[0:4]'"
            )
        axes = [_parse_coordinate(spec, item) for spec in coord_specs]
        size = 1
        for axis in axes:
            size *= len(axis)
        if len(uids) + size > MAX_PATTERN_EXPANSION:
            raise ValueError(f"expert pattern {pattern!r} expands to more than {MAX_PATTERN_EXPANSION} uids")
        for coords in itertools.product(*axes):
            uid = make_uid(name, coords)
            uids[uid] = None
    return list(uids)


def _split_items(pattern: str) -> list[str]:
    """Split on commas that are outside brackets, stripping whitespace; reject empty items."""
    items, depth, current = [], 0, []
    for char in pattern:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    for item in items:
        if not item:
            raise ValueError(f"expert pattern {pattern!r} has an empty item (check the commas)")
    return items


def _parse_coordinate(spec: str, item: str) -> range:
    """One coordinate of a pattern item: ``"3"`` or ``"[0:4]"``."""
    spec = spec.strip()
    if re.fullmatch(_COORD, spec):
        value = int(spec)
        return range(value, value + 1)
    match = _RANGE_RE.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"bad coordinate {spec!r} in expert pattern item {item!r}: expected a non-negative integer without"
            " leading zeros or a range like [0:4]"
        )
    start, stop = int(match.group(1)), int(match.group(2))
    if start >= stop:
        raise ValueError(f"empty range {spec!r} in expert pattern item {item!r}: [a:b] needs a < b")
    return range(start, stop)

"""Batched beam search over an expert grid, written as a generator that asks for DHT keys.

`beam_search` holds no I/O: it yields the grid-prefix keys it needs for the next level and receives their
records, so one driver runs it synchronously and another from an event loop (see `dht.directory`). Each grid
level is one request for the union of the prefixes that all queries' beams need.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence

import numpy as np

from dht.calls import RawRecords
from dht.records import check_prefix_value, is_withdrawn, parse_subkey
from dht.uids import UID_DELIMITER, split_uid

BeamSearch = Generator[list[str], Mapping[str, RawRecords], list[list[str]]]


def active_coordinates(records: RawRecords, num_dims: int, grid_size: int) -> list[int]:
    """Sorted next coordinates in ``[0, grid_size)`` that the prefix records list for `num_dims`-d uids."""
    coords = set()
    for subkey, (value, _expiration) in records.items():
        parsed = parse_subkey(subkey)
        if parsed is None or parsed.coord is None or not 0 <= parsed.coord < grid_size or is_withdrawn(value):
            continue
        if check_prefix_value(value, parsed.coord) is None and len(split_uid(value["uid"])[1]) == num_dims:
            coords.add(parsed.coord)
    return sorted(coords)


def beam_search(name: str, grid_scores: Sequence[np.ndarray], k: int, beam_size: int) -> BeamSearch:
    """For every query, the `k` live uids ``name.i.j…`` with the highest sum of per-dimension scores.

    ``grid_scores[d]`` has shape ``[num_queries, grid_size_d]``. Level ``d`` keeps, per query, the
    `beam_size` best prefixes of length ``d + 1`` among the live ones, so the result is exact when
    ``beam_size`` is at least the number of live prefixes per level (always for 1-d grids), and a close
    approximation otherwise. Uids come best first; a query gets fewer than `k` when fewer exist. Candidates
    scoring -inf are never returned; NaN scores raise ValueError.
    """
    scores = _check_scores(grid_scores)
    if k < 1 or beam_size < 1:
        raise ValueError(f"k and beam_size must be >= 1, got k={k}, beam_size={beam_size}")
    num_queries, num_dims = scores[0].shape[0], len(scores)
    prefixes = [name + UID_DELIMITER]  # distinct grid prefixes in the current beams
    beam_prefix = np.zeros((num_queries, 1), dtype=np.int64)  # index into prefixes
    beam_score = np.zeros((num_queries, 1), dtype=np.float64)  # -inf marks an empty beam slot
    if num_queries == 0:
        return []
    for dim, dim_scores in enumerate(scores):
        found = yield list(prefixes)
        grid_size = dim_scores.shape[1]
        coord_lists = [active_coordinates(found.get(prefix, {}), num_dims, grid_size) for prefix in prefixes]
        width = max(map(len, coord_lists))
        if width == 0:
            return [[] for _ in range(num_queries)]
        coords = np.full((len(prefixes), width), -1, dtype=np.int64)
        for row, coord_list in enumerate(coord_lists):
            coords[row, : len(coord_list)] = coord_list

        candidate_coords = coords[beam_prefix]  # [queries, beam, width]
        valid = (candidate_coords >= 0) & (beam_score > -np.inf)[:, :, None]
        gathered = np.take_along_axis(
            dim_scores, np.where(valid, candidate_coords, 0).reshape(num_queries, -1), axis=1
        ).reshape(candidate_coords.shape)
        candidates = np.where(valid, beam_score[:, :, None] + gathered, -np.inf).reshape(num_queries, -1)

        keep = min(k if dim == num_dims - 1 else beam_size, candidates.shape[1])
        best = _top(candidates, keep)  # [queries, keep], best first
        best_scores = np.take_along_axis(candidates, best, axis=1)
        slot, column = np.divmod(best, width)
        best_prefix = np.take_along_axis(beam_prefix, slot, axis=1)
        best_coord = coords[best_prefix, column]
        alive = best_scores > -np.inf

        if dim == num_dims - 1:
            return [
                [f"{prefixes[p]}{c}" for p, c, ok in zip(row_p, row_c, row_ok, strict=True) if ok]
                for row_p, row_c, row_ok in zip(best_prefix.tolist(), best_coord.tolist(), alive.tolist(), strict=True)
            ]
        codes = np.where(alive, best_prefix * grid_size + best_coord, -1)
        unique_codes, inverse = np.unique(codes[alive], return_inverse=True)
        prefixes = [f"{prefixes[code // grid_size]}{code % grid_size}{UID_DELIMITER}" for code in unique_codes.tolist()]
        beam_prefix = np.zeros_like(codes)
        beam_prefix[alive] = inverse.reshape(-1)
        beam_score = np.where(alive, best_scores, -np.inf)
        if not prefixes:
            return [[] for _ in range(num_queries)]
    raise AssertionError("unreachable")  # pragma: no cover


def _top(candidates: np.ndarray, keep: int) -> np.ndarray:
    """Column indices of the `keep` largest values in each row, sorted best first."""
    if keep < candidates.shape[1]:
        part = np.argpartition(-candidates, keep - 1, axis=1)[:, :keep]
    else:
        part = np.broadcast_to(np.arange(candidates.shape[1]), candidates.shape).copy()
    order = np.argsort(-np.take_along_axis(candidates, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _check_scores(grid_scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(grid_scores) == 0:
        raise ValueError("grid_scores needs one array per grid dimension, got none")
    scores = [np.asarray(_to_numpy(s), dtype=np.float64) for s in grid_scores]
    for dim, dim_scores in enumerate(scores):
        if dim_scores.ndim != 2:
            raise ValueError(f"grid_scores[{dim}] must have shape [num_queries, grid_size], got {dim_scores.shape}")
        if dim_scores.shape[0] != scores[0].shape[0]:
            raise ValueError(f"grid_scores disagree on the number of queries: {[s.shape[0] for s in scores]}")
        if dim_scores.shape[1] == 0:
            raise ValueError(f"grid_scores[{dim}] has grid size 0")
        if np.isnan(dim_scores).any():
            raise ValueError(f"grid_scores[{dim}] contains NaN")
    return scores


def _to_numpy(array: object) -> object:
    """Accept torch tensors (on any device, with or without grad) as well as array-likes."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        return array.detach().cpu().double().numpy()
    return array

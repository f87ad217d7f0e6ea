"""Batched beam search over an expert grid, written as a generator that asks for DHT keys.

`beam_search` holds no I/O: it yields the grid-prefix keys it needs for the next level and receives their
records, so one driver runs it synchronously and another from an event loop (see `dht.directory`). Each grid
level is one request for the union of the prefixes that all queries' beams need. `search_grid` is the same
search on parsed coordinates, for a router that keeps its own parsed cache of the grid.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, Sequence

import numpy as np
import torch

from dht.calls import RawRecords
from dht.grid import parse_grid_prefix
from dht.uids import UID_DELIMITER, make_uid

BeamSearch = Generator[list[str], Mapping[str, RawRecords], list[list[str]]]
GridSearch = Generator[list[str], Mapping[str, Sequence[int] | np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def beam_search(name: str, grid_scores: Sequence[np.ndarray], k: int, beam_size: int) -> BeamSearch:
    """For every query, the `k` live uids ``name.i.j…`` with the highest sum of per-dimension scores.

    ``grid_scores[d]`` has shape ``[num_queries, grid_size_d]``. Level ``d`` keeps, per query, the
    `beam_size` best prefixes of length ``d + 1`` among the live ones, so the result is exact when
    ``beam_size`` is at least the number of live prefixes per level (always for 1-d grids), and a close
    approximation otherwise. Uids come best first; a query gets fewer than `k` when fewer exist. Candidates
    scoring -inf are never returned; NaN scores raise ValueError. Receives raw prefix records; see
    `search_grid` for the search itself.
    """
    num_dims = len(grid_scores)
    search = search_grid(name, grid_scores, k, beam_size)
    try:
        prefixes = next(search)
        while True:
            found = yield prefixes
            prefixes = search.send(
                {prefix: parse_grid_prefix(prefix, found.get(prefix, {}), num_dims).coords for prefix in prefixes}
            )
    except StopIteration as stop:
        coords, scores = stop.value
    return [
        [make_uid(name, uid_coords) for uid_coords, score in zip(row, row_scores, strict=True) if score > -np.inf]
        for row, row_scores in zip(coords.tolist(), scores.tolist(), strict=True)
    ]


def search_grid(name: str, grid_scores: Sequence[np.ndarray], k: int, beam_size: int) -> GridSearch:
    """Beam search over the grid of `name` (see `beam_search`), on coordinates rather than records.

    Yields the grid prefixes (``"ffn."``, ``"ffn.3."``) whose live next coordinates it needs, all of one level
    at a time, and receives them as ``{prefix: coordinates}`` (any order; ones outside the grid are ignored).
    Returns ``(coords, scores)`` as torch tensors: ``coords[q, i]`` are the grid coordinates of query q's i-th
    best uid (``[num_queries, k, num_dims]``, -1 where it has fewer) and ``scores[q, i]`` their summed scores
    (-inf there). Scores are computed in the dtype of `grid_scores` (numpy or torch; float64 if not floating).
    """
    scores = _check_scores(grid_scores)
    if k < 1 or beam_size < 1:
        raise ValueError(f"k and beam_size must be >= 1, got k={k}, beam_size={beam_size}")
    num_queries, num_dims = scores[0].shape[0], len(scores)
    dtype = scores[0].dtype
    nothing = torch.full((num_queries, k, num_dims), -1, dtype=torch.int64), torch.full((num_queries, k), -math.inf)
    prefixes = [name + UID_DELIMITER]  # distinct grid prefixes in the current beams
    prefix_coords = torch.zeros((1, 0), dtype=torch.int64)  # their coordinates so far
    beam_prefix = torch.zeros((num_queries, 1), dtype=torch.int64)  # index into prefixes
    beam_score = torch.zeros((num_queries, 1), dtype=dtype)  # -inf marks an empty beam slot
    if num_queries == 0:
        return nothing
    for dim, dim_scores in enumerate(scores):
        found = yield list(prefixes)
        grid_size = dim_scores.shape[1]
        coord_lists = [found.get(prefix, ()) for prefix in prefixes]
        width = max(map(len, coord_lists))
        if width == 0:
            return nothing
        coords_array = np.full((len(prefixes), width), -1, dtype=np.int64)
        for row, coord_list in enumerate(coord_lists):
            coords_array[row, : len(coord_list)] = coord_list
        coords_array[coords_array >= grid_size] = -1  # outside the grid: not a candidate
        coords = torch.from_numpy(coords_array)

        candidate_coords = coords[beam_prefix]  # [queries, beam, width]
        valid = (candidate_coords >= 0) & (beam_score > -math.inf).unsqueeze(-1)
        gathered = dim_scores.gather(1, candidate_coords.clamp(min=0).reshape(num_queries, -1))
        candidates = (beam_score.unsqueeze(-1) + gathered.reshape(candidate_coords.shape)).masked_fill_(
            ~valid, -math.inf
        )
        candidates = candidates.reshape(num_queries, -1)

        keep = min(k if dim == num_dims - 1 else beam_size, candidates.shape[1])
        best_scores, best = candidates.topk(keep, dim=1)  # [queries, keep], best first
        slot, column = best.div(width, rounding_mode="floor"), best.remainder(width)
        best_prefix = beam_prefix.gather(1, slot)
        best_coord = coords[best_prefix, column]
        alive = best_scores > -math.inf

        if dim == num_dims - 1:
            found_coords, found_scores = nothing
            full = torch.cat([prefix_coords[best_prefix], best_coord.unsqueeze(-1)], dim=-1)
            found_coords[:, :keep] = full.masked_fill_(~alive.unsqueeze(-1), -1)
            found_scores[:, :keep] = best_scores
            return found_coords, found_scores
        codes = torch.where(alive, best_prefix * grid_size + best_coord, -1)
        unique_codes, inverse = torch.unique(codes[alive], return_inverse=True)
        parents, children = unique_codes.div(grid_size, rounding_mode="floor"), unique_codes.remainder(grid_size)
        pairs = zip(parents.tolist(), children.tolist(), strict=True)
        prefixes = [f"{prefixes[parent]}{child}{UID_DELIMITER}" for parent, child in pairs]
        prefix_coords = torch.cat([prefix_coords[parents], children.unsqueeze(1)], dim=1)
        beam_prefix = torch.zeros_like(codes)
        beam_prefix[alive] = inverse
        beam_score = best_scores.masked_fill(~alive, -math.inf)
        if not prefixes:
            return nothing
    raise AssertionError("unreachable")  # pragma: no cover


def _check_scores(grid_scores: Sequence[np.ndarray]) -> list[torch.Tensor]:
    if len(grid_scores) == 0:
        raise ValueError("grid_scores needs one array per grid dimension, got none")
    scores = [_to_tensor(s) for s in grid_scores]
    for dim, dim_scores in enumerate(scores):
        if dim_scores.ndim != 2:
            raise ValueError(
                f"grid_scores[{dim}] must have shape [num_queries, grid_size], got {tuple(dim_scores.shape)}"
            )
        if dim_scores.shape[0] != scores[0].shape[0]:
            raise ValueError(f"grid_scores disagree on the number of queries: {[s.shape[0] for s in scores]}")
        if dim_scores.shape[1] == 0:
            raise ValueError(f"grid_scores[{dim}] has grid size 0")
        if bool(torch.isnan(dim_scores).any()):
            raise ValueError(f"grid_scores[{dim}] contains NaN")
    dtype = torch.promote_types(*(s.dtype for s in scores)) if len(scores) > 1 else scores[0].dtype
    return [s.to(dtype) for s in scores]


def _to_tensor(array: object) -> torch.Tensor:
    """Accept torch tensors (on any device, with or without grad) as well as array-likes."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
    else:
        tensor = torch.as_tensor(np.asarray(array))
    return tensor if tensor.is_floating_point() else tensor.to(torch.float64)

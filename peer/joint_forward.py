"""Forwards of several small experts of one class in one computation: a compute pass's phase for forward pieces.

A 64 x 64 grid sends a peer a hundred or more experts with a token or two each in one ForwardMany. Computed one
by one, each costs a dozen operator calls on tiny tensors, and with a kept graph as many autograd nodes again;
for experts of a few thousand parameters that overhead is nearly all of the work. An expert class whose module
defines ``forward_many(modules, inputs)`` (the built-in `ffn` and `swiglu` do: their weights stacked, the
tokens padded, one batched matmul per layer) has the small experts of a pass computed by one call of it. It
returns each output padded: ``[experts, longest batch, ...]``, module i's outputs in the first rows of row i.

The outputs are those of each expert's own forward, up to rounding. When the forward is kept for a Backward
(`peer.graphs`), the experts of the call share one graph (`SharedGraph`): a Backward pass that holds all of them
runs it once; one that holds only some runs it for those, and the others recompute theirs when their Backward
comes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peer.backend import ExpertBackend

JOINT_MAX_PARAMETERS = 1 << 18
"""Experts with more parameters are computed alone: their compute outweighs the per-call overhead, and stacking
their weights would copy megabytes per pass."""

ForwardMany = Callable[[list[torch.nn.Module], list[list[torch.Tensor]]], tuple[torch.Tensor, ...]]


@dataclass(eq=False)
class SharedGraph:
    """The forward graph of several experts computed together: the members, in the order of their rows of the
    padded `outputs`, and their batch sizes; `consumed` once a Backward pass ran through it."""

    members: tuple[ExpertBackend, ...]
    outputs: tuple[torch.Tensor, ...]
    sizes: tuple[int, ...]
    consumed: bool = False

    def gradients(self, grad_outputs: dict[int, list[torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(padded output, padded gradient) pairs for one backward pass, from the output gradients of the members
        in it (by their row); the other members' rows get zeros."""
        pairs = []
        for position, output in enumerate(self.outputs):
            if not output.requires_grad:
                continue
            rows = [
                grad_outputs[row][position] if row in grad_outputs else output.new_zeros(size, *output.shape[2:])
                for row, size in enumerate(self.sizes)
            ]
            pairs.append((output, torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)))
        return pairs


@dataclass(eq=False)
class PendingForward:
    """One forward piece of a pass: its backend, inputs and `forward_id`, then its outputs."""

    backend: ExpertBackend
    inputs: list[torch.Tensor]
    forward_id: int
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """The batch size of this piece."""
        return int(self.inputs[0].shape[0])


def forward_many_of(backend: ExpertBackend) -> ForwardMany | None:
    """The joint forward of `backend`'s expert class, or None when its experts are computed one by one."""
    if backend.num_parameters > JOINT_MAX_PARAMETERS:
        return None
    return getattr(type(backend.module), "forward_many", None)


def run_forwards(pieces: list[PendingForward]) -> None:
    """Compute every piece: those sharing a joint forward (same class, size, device, and whether the graph is
    kept) together, in buckets of similar batch sizes; the others alone."""
    groups: dict[tuple, list[PendingForward]] = {}
    for piece in pieces:
        backend = piece.backend
        joint = forward_many_of(backend)
        if joint is None:
            piece.outputs = backend.forward(piece.inputs, piece.forward_id)
            continue
        key = (joint, backend.hidden_dim, backend.device, backend.keeps_graph(piece.forward_id))
        groups.setdefault(key, []).append(piece)
    for (joint, _, _, keep), members in groups.items():
        for bucket in _buckets(members):
            if len(bucket) == 1:
                bucket[0].outputs = bucket[0].backend.forward(bucket[0].inputs, bucket[0].forward_id)
            else:
                _forward_together(joint, bucket, keep)


def _buckets(pieces: list[PendingForward]) -> list[list[PendingForward]]:
    """Pieces grouped by batch size so that padding each to its bucket's largest at most doubles the tokens."""
    buckets: list[list[PendingForward]] = []
    current: list[PendingForward] = []
    tokens = 0
    for piece in sorted(pieces, key=lambda p: p.num_tokens):
        n = piece.num_tokens
        if current and (len(current) + 1) * n > 2 * (tokens + n):
            buckets.append(current)
            current, tokens = [], 0
        current.append(piece)
        tokens += n
    if current:
        buckets.append(current)
    return buckets


def _forward_together(joint: ForwardMany, pieces: list[PendingForward], keep: bool) -> None:
    backends = [piece.backend for piece in pieces]
    modules = [backend.module for backend in backends]
    device = backends[0].device
    sizes = tuple(piece.num_tokens for piece in pieces)
    if not keep:
        with torch.inference_mode():
            padded = joint(modules, [[t.to(device, non_blocking=True) for t in p.inputs] for p in pieces])
        for piece, outs in zip(pieces, _rows(padded, sizes), strict=True):
            piece.outputs = [t.cpu() for t in outs]
        return
    leaves = [[t.to(device).detach().requires_grad_(t.is_floating_point()) for t in p.inputs] for p in pieces]
    saved_bytes = 0

    def count_saved(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count_saved, lambda tensor: tensor):
        padded = joint(modules, leaves)
    shared = SharedGraph(tuple(backends), tuple(padded), sizes)
    share = saved_bytes // len(pieces)
    for row, (piece, inputs, outs) in enumerate(zip(pieces, leaves, _rows(padded, sizes), strict=True)):
        piece.backend.keep_forward(piece.forward_id, inputs, outs, share, shared, row)
        piece.outputs = [t.detach().cpu() for t in outs]


def _rows(padded: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, ...]]:
    """Each member's outputs: its row of every padded output, cut to its batch size."""
    return [tuple(output[row, :size] for output in padded) for row, size in enumerate(sizes)]

"""One hosted expert: its module, its optimizer and its counters."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from peer.experts import ExpertClass
from peer.graphs import ForwardGraphStore, KeptForward
from peer.joint_forward import SharedGraph
from peer.updates import apply_gradients, clear_gradients

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArgSpec:
    """Shape (batch dimension excluded) and dtype of one expert argument or output."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class ExpertBackend:
    """An expert module with its optimizer, as a peer hosts it.

    - `forward(inputs)` returns the outputs for a batch, without building a graph. With a `forward_id` and a
      `graphs` store, it builds the graph and keeps it there for the Backward of the same id.
    - `backward(inputs, grad_outputs, forward_id)` runs autograd through the kept graph when there is one for
      `forward_id`, built from these very inputs and parameters; otherwise it recomputes the forward with grad.
      It returns the gradients of the inputs and steps this expert's own optimizer (asynchronous expert
      updates, as in Learning@home). The gradient
      is clipped to `clip_grad_norm`; one that is NaN/Inf or whose norm exceeds `reject_grad_norm` is not
      applied: the update is skipped and counted in `updates_skipped`.
    Randomness (dropout) differs between the forward and a recomputed one; experts should not rely on it.
    Not thread-safe: the peer runs all compute one piece at a time (`peer.compute.ComputeRunner`).
    """

    def __init__(
        self,
        uid: str,
        expert_class: ExpertClass,
        hidden_dim: int,
        *,
        optimizer: str = "adam",
        lr: float = 1e-3,
        clip_grad_norm: float | None = None,
        reject_grad_norm: float = math.inf,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        graphs: ForwardGraphStore | None = None,
    ):
        self.uid, self.expert_cls, self.hidden_dim = uid, expert_class.name, hidden_dim
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.module: nn.Module = expert_class.module_cls(hidden_dim).to(self.device)
        self.optimizer_name = optimizer
        self.optimizer = _make_optimizer(optimizer, self.module.parameters(), lr)
        self.clip_grad_norm = clip_grad_norm
        self.reject_grad_norm = reject_grad_norm
        self.update_count = 0
        self.updates_skipped = 0

        sample_inputs = tuple(t.to(self.device) for t in expert_class.sample_input(2, hidden_dim))
        with torch.no_grad():
            sample_outputs = _as_tuple(self.module(*sample_inputs))
        self.input_specs = tuple(ArgSpec(tuple(t.shape[1:]), t.dtype) for t in sample_inputs)
        self.output_specs = tuple(ArgSpec(tuple(t.shape[1:]), t.dtype) for t in sample_outputs)
        self.num_parameters = sum(p.numel() for p in self.module.parameters())
        self.last_update_time = time.time()
        self.graphs = graphs
        self.params = tuple(self.module.parameters())
        self._param_pointers = frozenset(p.data_ptr() for p in self.params)

    def forward(self, inputs: list[torch.Tensor], forward_id: int = 0) -> list[torch.Tensor]:
        """Outputs of the expert for one batch (tensors on the CPU); keeps the graph for a nonzero `forward_id`."""
        if self.keeps_graph(forward_id):
            return self._forward_kept(inputs, forward_id)
        inputs = [t.to(self.device, non_blocking=True) for t in inputs]
        with torch.inference_mode():
            outputs = _as_tuple(self.module(*inputs))
        return [t.cpu() for t in outputs]

    def keeps_graph(self, forward_id: int) -> bool:
        """Whether a forward of this id is computed with autograd and kept for its Backward."""
        return bool(forward_id) and self.graphs is not None and self.graphs.max_bytes > 0

    def _forward_kept(self, inputs: list[torch.Tensor], forward_id: int) -> list[torch.Tensor]:
        leaves = [t.to(self.device).detach().requires_grad_(t.is_floating_point()) for t in inputs]
        saved_bytes = 0

        def count_saved(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved_bytes
            if tensor.data_ptr() not in self._param_pointers:
                saved_bytes += tensor.numel() * tensor.element_size()
            return tensor

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count_saved, lambda tensor: tensor):
            outputs = _as_tuple(self.module(*leaves))
        self.keep_forward(forward_id, leaves, outputs, saved_bytes)
        return [t.detach().cpu() for t in outputs]

    def keep_forward(
        self,
        forward_id: int,
        leaves: list[torch.Tensor],
        outputs: tuple[torch.Tensor, ...],
        saved_bytes: int,
        shared: SharedGraph | None = None,
        row: int = 0,
    ) -> None:
        """Keep a forward computed with autograd from the input `leaves` for the Backward of `forward_id`;
        `shared`: the graph it shares with other experts' forwards, as their `row` (`peer.joint_forward`)."""
        if any(t.requires_grad for t in outputs):
            nbytes = saved_bytes + sum(t.numel() * t.element_size() for t in (*leaves, *outputs))
            kept = KeptForward(leaves, outputs, self._param_versions(), nbytes, shared=shared, row=row)
            self.graphs.put(self.uid, forward_id, kept)

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def _take_kept(self, forward_id: int, inputs: list[torch.Tensor]) -> KeptForward | None:
        """The kept forward of `forward_id` if it was computed from `inputs` with the current parameters."""
        if not forward_id or self.graphs is None:
            return None
        kept = self.graphs.pop(self.uid, forward_id)
        usable = (
            kept is not None
            and (kept.shared is None or not kept.shared.consumed)
            and kept.param_versions == self._param_versions()
            and len(kept.inputs) == len(inputs)
            and all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b.to(self.device))
                for a, b in zip(kept.inputs, inputs, strict=True)
            )
        )
        if usable:
            self.graphs.hits += 1
            return kept
        self.graphs.misses += 1
        return None

    def backward(
        self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor], forward_id: int = 0
    ) -> list[torch.Tensor]:
        """Gradients of the inputs for one batch; applies one optimizer step to the expert."""
        pending = self.backward_begin(inputs, grad_outputs, forward_id)
        run_backward([pending])
        return self.backward_end(pending)

    def backward_begin(
        self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor], forward_id: int = 0
    ) -> PendingBackward:
        """The first part of `backward`: the batch's forward graph (kept, or recomputed) and its output gradients.

        `run_backward` then runs the graphs of several experts' batches in one autograd pass, and `backward_end`
        steps each expert's optimizer: what `backward` does for one.
        """
        grad_outputs = [t.to(self.device) for t in grad_outputs]
        kept = self._take_kept(forward_id, inputs)
        if kept is not None and kept.shared is not None:
            return PendingBackward(self, kept.inputs, [], kept.shared, kept.row, grad_outputs)
        if kept is not None:
            inputs = kept.inputs
            outputs = kept.outputs
        else:
            inputs = [t.to(self.device).detach().requires_grad_(t.is_floating_point()) for t in inputs]
            with torch.enable_grad():
                outputs = _as_tuple(self.module(*inputs))
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs, strict=True) if out.requires_grad]
        return PendingBackward(self, inputs, pairs)

    def backward_end(self, pending: PendingBackward) -> list[torch.Tensor]:
        """The last part of `backward`: the gradients of the inputs (`run_backward` stepped the optimizer)."""
        return [
            (t.grad if t.grad is not None else torch.zeros_like(t)).cpu()
            if t.is_floating_point()
            else torch.zeros_like(t).cpu()
            for t in pending.inputs
        ]

    def state_dict(self) -> dict:
        """Parameters, optimizer state and counters, copied so that later updates do not change them."""
        return {
            "uid": self.uid,
            "expert_cls": self.expert_cls,
            "hidden_dim": self.hidden_dim,
            "module": {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()},
            "optimizer": _clone_state(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "update_count": self.update_count,
            "updates_skipped": self.updates_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved; refuses a state of another expert class or size."""
        if state.get("expert_cls") != self.expert_cls or state.get("hidden_dim") != self.hidden_dim:
            raise ValueError(
                f"checkpoint of {self.uid} holds a {state.get('expert_cls')} expert of hidden_dim "
                f"{state.get('hidden_dim')}, but this peer hosts a {self.expert_cls} of hidden_dim {self.hidden_dim}"
            )
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.update_count = int(state.get("update_count", 0))
        self.updates_skipped = int(state.get("updates_skipped", 0))


@dataclass
class PendingBackward:
    """A batch between `ExpertBackend.backward_begin` and `backward_end`: its input leaves and (output, gradient)
    pairs; or, for a forward computed with other experts', the `shared` graph, its row there and its output
    gradients."""

    backend: ExpertBackend
    inputs: list[torch.Tensor]
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    shared: SharedGraph | None = None
    row: int = 0
    grad_outputs: list[torch.Tensor] | None = None


def run_backward(pending: list[PendingBackward]) -> None:
    """Back-propagate several batches (of distinct experts) in one autograd pass, then step each expert's optimizer
    (`peer.updates`): their graphs share nothing, so each expert's gradients and update are those its own pass
    would give, at one engine call's and one foreach step's overhead for all."""
    pairs = [pair for batch in pending for pair in batch.pairs]
    by_graph: dict[SharedGraph, dict[int, list[torch.Tensor]]] = {}
    for batch in pending:
        if batch.shared is not None:
            by_graph.setdefault(batch.shared, {})[batch.row] = batch.grad_outputs
    for graph, grad_outputs in by_graph.items():
        pairs += graph.gradients(grad_outputs)
    try:
        if pairs:
            with torch.enable_grad():
                torch.autograd.backward([out for out, _ in pairs], grad_tensors=[grad for _, grad in pairs])
    finally:
        _close_shared_graphs(pending)
    apply_gradients([batch.backend for batch in pending])


def _close_shared_graphs(pending: list[PendingBackward]) -> None:
    """Mark the shared graphs this pass ran through as used up, and clear the zero gradients they gave the experts
    that are not in this pass (computed with them, backpropagated later: they recompute)."""
    shared = {batch.shared for batch in pending if batch.shared is not None}
    if not shared:
        return
    stepping = {id(batch.backend) for batch in pending}
    for graph in shared:
        graph.consumed = True
        for backend in graph.members:
            if id(backend) not in stepping:
                clear_gradients(backend.params)


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer | None:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "none":
        return None
    raise ValueError(f"unknown optimizer {name!r}; choose adam, sgd or none")


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, list | tuple) else (outputs,)


def _clone_state(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone_state(v) for v in value)
    return value

"""The state that makes replicas of one expert the same expert: named tensors plus an update count.

`capture` flattens an `ExpertBackend`'s parameters, buffers and optimizer state into named tensors; `restore`
puts such a state back; `average` is the mean of several replicas' states, computed in the order given so that
every replica that averages the same states in the same order gets bit-identical results; `apply_average`
moves a live expert by the difference between that mean and the snapshot it contributed, so that updates made
meanwhile are kept.

Names: ``module.<name>`` for every entry of the module's state dict, ``optimizer.<index>.<key>`` for the
per-parameter optimizer state (``exp_avg``, ``exp_avg_sq``, ``step`` for Adam; ``momentum_buffer`` for SGD).
Floating tensors are averaged; others (and Adam's ``step``, which must stay the count of steps taken) take the
largest value. The update count of a mean is the largest of the update counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peer.backend import ExpertBackend

MODULE_PREFIX = "module."
OPTIMIZER_PREFIX = "optimizer."
_MAX_KEYS = frozenset({"step"})  # optimizer entries that count steps: the most advanced replica's count wins


@dataclass
class ExpertState:
    """One replica's expert as named CPU tensors, with the optimizer steps it has applied."""

    update_count: int
    tensors: dict[str, torch.Tensor]


def capture(backend: ExpertBackend) -> ExpertState:
    """A copy of `backend`'s state that later updates do not change (call it where no compute runs)."""
    tensors = {MODULE_PREFIX + k: v.detach().to("cpu", copy=True) for k, v in backend.module.state_dict().items()}
    if backend.optimizer is not None:
        for index, entries in backend.optimizer.state_dict()["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{OPTIMIZER_PREFIX}{index}.{key}"] = value.detach().to("cpu", copy=True)
    return ExpertState(backend.update_count, tensors)


def restore(backend: ExpertBackend, state: ExpertState) -> None:
    """Make `backend` the expert `state` describes: parameters, optimizer state and update count.

    Raises ValueError when the state does not fit the module (another class or size), before changing anything.
    """
    module_state = _module_part(backend, state)
    backend.module.load_state_dict(module_state)
    if backend.optimizer is not None:
        saved = backend.optimizer.state_dict()
        saved["state"] = _optimizer_part(backend, state)
        backend.optimizer.load_state_dict(saved)
    backend.update_count = state.update_count


def average(states: Sequence[ExpertState]) -> ExpertState:
    """The mean of `states`, summed in the order given (the same order gives the same bits everywhere).

    A tensor missing from some states (optimizer state of a replica that never stepped) is averaged over the
    states that hold it.
    """
    if not states:
        raise ValueError("average of no states")
    names = sorted({name for state in states for name in state.tensors})
    tensors = {}
    for name in names:
        values = [state.tensors[name] for state in states if name in state.tensors]
        if values[0].is_floating_point() and name.rsplit(".", 1)[-1] not in _MAX_KEYS:
            total = values[0].to(torch.float64 if values[0].dtype == torch.float64 else torch.float32, copy=True)
            for value in values[1:]:
                total += value
            tensors[name] = (total / len(values)).to(values[0].dtype)
        else:
            tensors[name] = torch.stack([value.reshape(-1) for value in values]).amax(dim=0).reshape(values[0].shape)
    return ExpertState(max(state.update_count for state in states), tensors)


def apply_average(backend: ExpertBackend, snapshot: ExpertState, mean: ExpertState) -> None:
    """Move `backend` by ``mean - snapshot``: the mean itself when nothing changed since `snapshot` was taken.

    Tensors the expert did not have at the snapshot (first optimizer steps since) are taken from the mean.
    """
    current = capture(backend)
    moved = {}
    for name, target in mean.tensors.items():
        now = current.tensors.get(name)
        before = snapshot.tensors.get(name)
        if now is None or before is None or now.shape != target.shape:
            moved[name] = target.clone()
        elif now.is_floating_point() and name.rsplit(".", 1)[-1] not in _MAX_KEYS:
            moved[name] = target if torch.equal(now, before) else now + (target - before)
        else:
            moved[name] = torch.maximum(now, target)
    for name, value in current.tensors.items():
        moved.setdefault(name, value)
    restore(backend, ExpertState(backend.update_count + mean.update_count - snapshot.update_count, moved))


def _module_part(backend: ExpertBackend, state: ExpertState) -> dict[str, torch.Tensor]:
    expected = backend.module.state_dict()
    module_state = {k[len(MODULE_PREFIX) :]: v for k, v in state.tensors.items() if k.startswith(MODULE_PREFIX)}
    if set(module_state) != set(expected):
        missing, extra = sorted(set(expected) - set(module_state)), sorted(set(module_state) - set(expected))
        raise ValueError(f"state of {backend.uid} does not fit its module (missing {missing}, unexpected {extra})")
    for name, value in module_state.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise ValueError(
                f"state of {backend.uid}: {name} is {list(value.shape)} {value.dtype}, "
                f"the module has {list(expected[name].shape)} {expected[name].dtype}"
            )
    return module_state


def _optimizer_part(backend: ExpertBackend, state: ExpertState) -> dict[int, dict[str, torch.Tensor]]:
    groups = backend.optimizer.state_dict()["param_groups"] if backend.optimizer is not None else []
    num_params = sum(len(group["params"]) for group in groups)
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in state.tensors.items():
        if not name.startswith(OPTIMIZER_PREFIX):
            continue
        index, _, key = name[len(OPTIMIZER_PREFIX) :].partition(".")
        if not index.isdigit() or int(index) >= num_params or not key:
            raise ValueError(f"state of {backend.uid} has an optimizer entry {name!r} this expert does not have")
        entries.setdefault(int(index), {})[key] = value.clone()
    return entries

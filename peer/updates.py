"""One optimizer step for the experts of a compute pass: their gradients clipped, checked and applied together.

A peer steps every expert it backpropagates through, each with its own optimizer (asynchronous expert updates).
A pass of a 64 x 64 grid holds a hundred or more small experts; stepping each alone is a few dozen small tensor
operations per parameter, which costs more than the experts' forward and backward together. Here the per-tensor
work of all of them runs as `torch._foreach_*` calls over one list, with each expert's own clipping, its own
rejection of a poisoned gradient, its own Adam moments and step count: the numbers each expert would get alone.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.optim.adam import adam

if TYPE_CHECKING:
    from peer.backend import ExpertBackend

logger = logging.getLogger(__name__)

_ADAM_STEP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
"""The settings an Adam parameter group's step depends on: groups that agree on them are stepped together."""


def apply_gradients(backends: Sequence[ExpertBackend]) -> None:
    """Clip, check and apply each backend's accumulated gradients, then clear them.

    Per backend, as `ExpertBackend` documents: the gradient is scaled down to `clip_grad_norm` (its total 2-norm
    over the expert's parameters); one whose norm is NaN/Inf or above `reject_grad_norm` is not applied and is
    counted in `updates_skipped`; otherwise its optimizer steps and `update_count` grows. A backend without an
    optimizer, or without gradients, only has them cleared.
    """
    stepping: list[tuple[ExpertBackend, list[torch.Tensor]]] = []
    for backend in backends:
        params = [p for p in backend.params if p.grad is not None]
        if backend.optimizer is None or not params:
            clear_gradients(params)
        else:
            stepping.append((backend, params))
    if not stepping:
        return
    norms = _grad_norms(stepping)
    accepted = []
    for (backend, params), norm in zip(stepping, norms, strict=True):
        if not math.isfinite(norm) or norm > backend.reject_grad_norm:
            backend.updates_skipped += 1
            logger.warning("%s: skipped an update with gradient norm %.3g (poisoned or diverged)", backend.uid, norm)
            clear_gradients(params)
        else:
            accepted.append((backend, params, norm))
    _clip([(params, backend.clip_grad_norm, norm) for backend, params, norm in accepted])
    _step([backend for backend, _, _ in accepted])
    now = time.time()
    for backend, params, _ in accepted:
        backend.update_count += 1
        backend.last_update_time = now
        clear_gradients(params)


def clear_gradients(params) -> None:
    """Drop the gradients of `params` (set them to None)."""
    for param in params:
        param.grad = None


_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Where `torch._fused_adam_` computes: one kernel for a whole list of parameters."""


def _grad_norms(stepping: list[tuple[ExpertBackend, list[torch.Tensor]]]) -> list[float]:
    """Each backend's total gradient 2-norm, from one `_foreach_norm` over all their gradients."""
    grads = [p.grad for _, params in stepping for p in params]
    norms = torch._foreach_norm(grads)
    if len({(norm.device, norm.dtype) for norm in norms}) > 1:
        norms = [norm.to("cpu", torch.float64) for norm in norms]
    per_tensor = torch.stack(norms).to("cpu", torch.float64)
    owner = torch.repeat_interleave(torch.arange(len(stepping)), torch.tensor([len(p) for _, p in stepping]))
    squares = torch.zeros(len(stepping), dtype=torch.float64).index_add_(0, owner, per_tensor * per_tensor)
    return squares.sqrt().tolist()


def _clip(groups: list[tuple[list[torch.Tensor], float | None, float]]) -> None:
    """Scale each group's gradients by min(1, max_norm / (norm + 1e-6)), as `clip_grad_norm_` does."""
    grads: list[torch.Tensor] = []
    scales: list[float] = []
    for params, max_norm, norm in groups:
        scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            grads += [p.grad for p in params]
            scales += [scale] * len(params)
    if grads:
        torch._foreach_mul_(grads, scales)


def _step(backends: list[ExpertBackend]) -> None:
    """One optimizer step per backend: plain Adam groups that agree on their settings in one foreach call, any
    other optimizer by its own `step()`."""
    together: dict[tuple, list[tuple[torch.optim.Adam, dict]]] = {}
    for backend in backends:
        optimizer = backend.optimizer
        groups = optimizer.param_groups
        plain_adam = (
            type(optimizer) is torch.optim.Adam
            and len(groups) == 1
            and not any(groups[0].get(flag) for flag in ("capturable", "differentiable", "fused"))
            and not torch.is_tensor(groups[0]["lr"])
            and not optimizer._optimizer_step_pre_hooks
            and not optimizer._optimizer_step_post_hooks
        )
        if plain_adam:
            key = tuple(_listless(groups[0].get(name)) for name in _ADAM_STEP_KEYS)
            together.setdefault(key, []).append((optimizer, groups[0]))
        else:
            optimizer.step()
    for members in together.values():
        _adam_step(members)


def _adam_step(members: list[tuple[torch.optim.Adam, dict]]) -> None:
    params: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    exp_avgs: list[torch.Tensor] = []
    exp_avg_sqs: list[torch.Tensor] = []
    max_exp_avg_sqs: list[torch.Tensor] = []
    state_steps: list[torch.Tensor] = []
    has_complex = False
    for optimizer, group in members:
        lists = _adam_lists(optimizer, group)
        if lists is None:  # creates missing state as Adam.step would
            has_complex |= optimizer._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
            )
            continue
        params += lists.params
        grads += [p.grad for p in lists.params]
        exp_avgs += lists.exp_avgs
        exp_avg_sqs += lists.exp_avg_sqs
        max_exp_avg_sqs += lists.max_exp_avg_sqs
        state_steps += lists.state_steps
        has_complex |= lists.has_complex
    group = members[0][1]
    beta1, beta2 = group["betas"]
    fused = all(p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in params)
    with torch.no_grad():
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            foreach=not fused,
            fused=fused,
            has_complex=has_complex,
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


@dataclass(slots=True, eq=False)
class _AdamLists:
    """One Adam optimizer's per-parameter state tensors, in the order `_init_group` lists them."""

    state: dict
    group_params: list
    params: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor]
    state_steps: list[torch.Tensor]
    has_complex: bool


_adam_lists_of: weakref.WeakKeyDictionary[torch.optim.Adam, _AdamLists] = weakref.WeakKeyDictionary()


def _adam_lists(optimizer: torch.optim.Adam, group: dict) -> _AdamLists | None:
    """The state lists of `optimizer`'s one group, remembered from the last step while they still hold: the same
    state and parameter objects (`load_state_dict` replaces both), every parameter with a gradient and a state.
    None when they must be (re)built by `_init_group`; they are built and remembered here for the next step."""
    group_params = group["params"]
    cached = _adam_lists_of.get(optimizer)
    if (
        cached is not None
        and cached.state is optimizer.state
        and cached.group_params is group_params
        and len(cached.params) == len(group_params)
        and all(p.grad is not None for p in group_params)
    ):
        return cached
    _adam_lists_of.pop(optimizer, None)
    if not all(p.grad is not None for p in group_params):
        return None
    lists = _AdamLists(optimizer.state, group_params, [], [], [], [], [], False)
    lists.has_complex = optimizer._init_group(
        group, lists.params, [], lists.exp_avgs, lists.exp_avg_sqs, lists.max_exp_avg_sqs, lists.state_steps
    )
    _adam_lists_of[optimizer] = lists
    return lists


def _listless(value):
    return tuple(value) if isinstance(value, list) else value

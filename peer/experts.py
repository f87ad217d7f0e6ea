"""Expert classes a peer can host, by name: built-in `ffn` and `swiglu`, and user classes from a file.

An expert class is an `nn.Module` whose constructor takes `hidden_dim` and whose forward maps a batch of
tokens to a batch of outputs: the first dimension of every input and output is the batch (token) dimension.
`sample_input(batch_size, hidden_dim)` gives example inputs, from which the peer derives the expert's
input and output schema (shapes beyond the batch dimension, dtypes) and validates every request against it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SampleInputFn = Callable[[int, int], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ExpertClass:
    """A registered expert class: how to build it and what its inputs look like."""

    name: str
    module_cls: Callable[[int], nn.Module]
    sample_input: SampleInputFn


EXPERT_CLASSES: dict[str, ExpertClass] = {}


def _hidden_sample(batch_size: int, hidden_dim: int) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(batch_size, hidden_dim),)


def register_expert_class(name: str, sample_input: SampleInputFn = _hidden_sample):
    """Decorator that registers an `nn.Module` class as an expert class under `name`.

    Use it in a file passed to `dmoe peer --custom-module FILE.py`::

        @register_expert_class("my_ffn")
        class MyFFN(nn.Module):
            def __init__(self, hidden_dim: int): ...

    `sample_input(batch_size, hidden_dim)` returns example inputs (default: one float32 `[batch, hidden]`).
    """

    def _register(module_cls):
        known = EXPERT_CLASSES.get(name)
        if known is not None and _qualified(known.module_cls) != _qualified(module_cls):
            raise ValueError(f"expert class {name!r} is already registered by {_qualified(known.module_cls)}")
        EXPERT_CLASSES[name] = ExpertClass(name, module_cls, sample_input)
        return module_cls

    return _register


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_expert_class(name: str) -> ExpertClass:
    """The registered expert class called `name`, or a ValueError listing the known ones."""
    try:
        return EXPERT_CLASSES[name]
    except KeyError:
        known = ", ".join(sorted(EXPERT_CLASSES))
        raise ValueError(
            f"unknown expert class {name!r}; known: {known} (add your own with --custom-module FILE.py)"
        ) from None


def load_custom_module(path: str | Path) -> None:
    """Execute a Python file that registers expert classes with `register_expert_class`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"custom module {path} does not exist")
    module_name = f"dmoe_custom_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


@register_expert_class("ffn")
class FeedForwardExpert(nn.Module):
    """Linear(h, 4h) - GELU - Linear(4h, h), added to the input, then LayerNorm.

    The same layers, shapes and FLOPs as hivemind's `ffn` expert, so benchmarks compare like with like.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.ffn = nn.Linear(hidden_dim, 4 * hidden_dim)
        self.ffn_output = nn.Linear(4 * hidden_dim, hidden_dim)
        self.layer_norm = nn.LayerNorm(hidden_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm(x + FFN(x))."""
        hidden = self.ffn_output(nn.functional.gelu(self.ffn(x)))
        return self.layer_norm(x + hidden)

    @staticmethod
    def forward_many(modules: list[FeedForwardExpert], inputs: list[list[torch.Tensor]]) -> tuple[torch.Tensor]:
        """`forward` of each module on its own inputs, as one batched computation (`peer.joint_forward`)."""
        x = _padded(inputs)
        hidden = _batched_linear(x, [m.ffn for m in modules])
        hidden = _batched_linear(nn.functional.gelu(hidden), [m.ffn_output for m in modules])
        return (_batched_layer_norm(x + hidden, [m.layer_norm for m in modules]),)


@register_expert_class("swiglu")
class SwiGLUExpert(nn.Module):
    """SwiGLU feed-forward (as in LLaMA): W2(silu(W1 x) * W3 x), added to the input, then LayerNorm.

    The inner width is 8h/3 rounded up to a multiple of 8, which keeps the FLOPs close to `ffn`.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        inner_dim = (8 * hidden_dim // 3 + 7) // 8 * 8
        self.gate_proj = nn.Linear(hidden_dim, inner_dim, bias=False)
        self.up_proj = nn.Linear(hidden_dim, inner_dim, bias=False)
        self.down_proj = nn.Linear(inner_dim, hidden_dim, bias=False)
        self.layer_norm = nn.LayerNorm(hidden_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm(x + SwiGLU(x))."""
        hidden = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.layer_norm(x + hidden)

    @staticmethod
    def forward_many(modules: list[SwiGLUExpert], inputs: list[list[torch.Tensor]]) -> tuple[torch.Tensor]:
        """`forward` of each module on its own inputs, as one batched computation (`peer.joint_forward`)."""
        x = _padded(inputs)
        gate = _batched_linear(x, [m.gate_proj for m in modules])
        up = _batched_linear(x, [m.up_proj for m in modules])
        hidden = _batched_linear(nn.functional.silu(gate) * up, [m.down_proj for m in modules])
        return (_batched_layer_norm(x + hidden, [m.layer_norm for m in modules]),)


def _padded(inputs: list[list[torch.Tensor]]) -> torch.Tensor:
    """The single inputs of several experts as one [experts, longest batch, hidden] tensor padded with zeros."""
    return nn.utils.rnn.pad_sequence([args[0] for args in inputs], batch_first=True)


def _batched_linear(x: torch.Tensor, layers: list[nn.Linear]) -> torch.Tensor:
    """Each expert's `nn.Linear` on its rows of `x` ([experts, tokens, in]): one batched matmul."""
    weight = _stacked([layer.weight for layer in layers]).transpose(1, 2)
    if layers[0].bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(_stacked([layer.bias for layer in layers]).unsqueeze(1), x, weight)


def _batched_layer_norm(x: torch.Tensor, norms: list[nn.LayerNorm]) -> torch.Tensor:
    """Each expert's `nn.LayerNorm` on its rows of `x` ([experts, tokens, hidden])."""
    normed = nn.functional.layer_norm(x, norms[0].normalized_shape, eps=norms[0].eps)
    weight = _stacked([norm.weight for norm in norms]).unsqueeze(1)
    bias = _stacked([norm.bias for norm in norms]).unsqueeze(1)
    return torch.addcmul(bias, normed, weight)


def _stacked(params: list[torch.Tensor]) -> torch.Tensor:
    """The experts' `params` (one per expert) stacked. Under autograd it is a leaf of its own whose gradient each
    parameter's ``.grad`` receives its row of, as a graph through every parameter would accumulate it, but at one
    autograd node for all of them instead of one per parameter."""
    with torch.no_grad():
        stacked = torch.stack(params)
    if torch.is_grad_enabled() and params[0].requires_grad:
        stacked.requires_grad_()
        stacked.register_hook(lambda grad: _hand_out(params, grad))
    return stacked


def _hand_out(params: list[torch.Tensor], grad: torch.Tensor) -> None:
    # in the layout of the parameters, as autograd's own accumulation gives it: the gradient of a transposed use
    # arrives transposed, and the fused optimizers read a gradient as if it had its parameter's strides
    for param, row in zip(params, grad.contiguous().unbind(0), strict=True):
        param.grad = row if param.grad is None else param.grad + row

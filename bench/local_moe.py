"""The physical limit: a top-k MoE layer whose experts are called in-process, with no network in between.

`LocalMoE` routes exactly as `router_client.RemoteMixtureOfExperts` does (a linear gate, the top-k experts per
token, softmax over the chosen scores) and calls the same `FeedForwardExpert` modules, seeded as the peers seed
them (`make_backends`). A training step (`train_step`) is what the peers do in total: forward, backward, then
per expert that received tokens gradient clipping at 1.0 and one Adam step.

Two flavours of training step:

* ``"autograd"`` (the limit): one forward that keeps its activations, one backward;
* ``"recompute"`` (what a peer does when it has not kept the forward's graph): a forward without a graph, then
  per expert a second forward with a graph and its backward, as `peer.ExpertBackend.backward` does then.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.servers import expert_seed
from peer import ExpertBackend, get_expert_class


def make_backends(prefix: str, num_experts: int, hidden_dim: int, device: str = "cpu") -> list[ExpertBackend]:
    """The experts `prefix.0 … prefix.(n-1)` with the weights, optimizer and clipping of a dmoe peer."""
    expert_class = get_expert_class("ffn")
    return [
        ExpertBackend(
            f"{prefix}.{i}",
            expert_class,
            hidden_dim,
            optimizer="adam",
            lr=1e-3,
            clip_grad_norm=1.0,
            device=device,
            seed=expert_seed(f"{prefix}.{i}"),
        )
        for i in range(num_experts)
    ]


class LocalMoE(nn.Module):
    """Top-`k` MoE over in-process experts; `gate` is shared with the remote layers it is compared with."""

    def __init__(self, gate: nn.Linear, backends: list[ExpertBackend], k: int, device: str = "cpu"):
        super().__init__()
        self.gate, self.backends, self.k, self.device = gate, backends, k, torch.device(device)

    def route(self, x: torch.Tensor):
        scores = self.gate(x)
        top_scores, top_index = scores.topk(self.k, dim=-1)
        return torch.softmax(top_scores, dim=-1), top_index

    def _dispatch(self, top_index: torch.Tensor):
        for expert in range(len(self.backends)):
            token, slot = (top_index == expert).nonzero(as_tuple=True)
            if len(token):
                yield expert, token, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Autograd forward (the graph through the experts is kept when grad is enabled)."""
        weights, top_index = self.route(x)
        out = torch.zeros_like(x)
        for expert, token, slot in self._dispatch(top_index):
            inputs = x[token].to(self.device, non_blocking=True)
            y = self.backends[expert].module(inputs).to(x.device)
            out = out.index_add(0, token, y * weights[token, slot, None])
        return out

    @torch.inference_mode()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without any graph."""
        return self.forward(x)

    def train_step(self, x: torch.Tensor, grad_output: torch.Tensor, mode: str = "autograd") -> None:
        """One training step of the layer: forward, backward into `x` and the gate, expert optimizer steps."""
        if mode == "autograd":
            used = [expert for expert, _, _ in self._dispatch(self.route(x)[1].detach())]
            self.forward(x).backward(grad_output)
            for expert in used:
                _optimizer_step(self.backends[expert])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return
        if mode != "recompute":
            raise ValueError(f"unknown mode {mode!r}")
        weights, top_index = self.route(x)
        jobs = list(self._dispatch(top_index.detach()))
        outputs = {}
        for expert, token, _slot in jobs:  # what Forward does on a peer (the clone stands for the wire)
            outputs[expert] = self.backends[expert].forward([x[token].detach()])[0].clone()
        combined = torch.zeros_like(x)
        for expert, token, slot in jobs:
            combined = combined.index_add(0, token, outputs[expert] * weights[token, slot, None])
        combined.backward(grad_output, inputs=[self.gate.weight, self.gate.bias])
        grad_x = torch.zeros_like(x)
        for expert, token, slot in jobs:  # a peer's Backward without a kept graph: recompute, backward, step
            grad_out = grad_output[token] * weights[token, slot, None].detach()
            (grad_in,) = self.backends[expert].backward([x[token].detach()], [grad_out])
            grad_x.index_add_(0, token, grad_in.to(grad_x.device))
        if x.requires_grad:
            x.grad = grad_x if x.grad is None else x.grad + grad_x


def _optimizer_step(backend: ExpertBackend) -> None:
    """What `ExpertBackend.backward` does after the gradients: clip at `clip_grad_norm`, step, drop the grads."""
    params = [p for p in backend.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, backend.clip_grad_norm or float("inf"))
    if bool(torch.isfinite(norm)):
        backend.optimizer.step()
    backend.optimizer.zero_grad(set_to_none=True)

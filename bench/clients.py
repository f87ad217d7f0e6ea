"""The client side of each contender: dmoe's router, hivemind's RemoteMixtureOfExperts, sharing one gate."""

from __future__ import annotations

import time

import torch
from torch import nn


def make_gate(hidden_dim: int, num_experts: int, *, seed: int = 1, fixed: tuple[int, ...] | None = None) -> nn.Linear:
    """The gate every side uses. With `fixed`, every token goes to those experts (zero weight, large bias)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gate = nn.Linear(hidden_dim, num_experts)
    if fixed is not None:
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.fill_(-5.0)
            for rank, expert in enumerate(fixed):
                gate.bias[expert] = 5.0 - rank
    return gate


def copy_gate(gate: nn.Linear, into: nn.Linear) -> None:
    with torch.no_grad():
        into.weight.copy_(gate.weight)
        into.bias.copy_(gate.bias)


def dmoe_layer(initial_peers, hidden_dim: int, prefix: str, num_experts: int, k: int, gate: nn.Linear, **options):
    """`router_client.RemoteMixtureOfExperts` over the swarm at `initial_peers`, with `gate`'s weights, once
    its catalog lists all `num_experts` experts."""
    from router_client import RemoteMixtureOfExperts

    options = {"forward_timeout": 120.0, "backward_timeout": 120.0, **options}
    layer = RemoteMixtureOfExperts(hidden_dim, (num_experts,), prefix, k, initial_peers=initial_peers, **options)
    copy_gate(gate, layer.gate)
    deadline = time.monotonic() + 60
    while True:
        with torch.no_grad():
            layer(torch.zeros(1, hidden_dim))
        live = len(_live_uids(layer))
        if live == num_experts:
            return layer
        if time.monotonic() > deadline:
            raise RuntimeError(f"dmoe router sees {live} of {num_experts} experts")
        time.sleep(1.0)


def _live_uids(layer) -> list[str]:
    """The uids the router's catalog lists (its cached view of the DHT)."""
    catalog = layer.catalog
    return list(getattr(getattr(catalog, "view", catalog), "uids", []))


class HivemindClient:
    """A client-mode hivemind DHT joined to a hivemind server, and the MoE layers built on it."""

    def __init__(self, initial_peers):
        import hivemind

        self.dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=True)

    def layer(self, hidden_dim: int, prefix: str, num_experts: int, k: int, gate: nn.Linear, **options):
        """`hivemind.moe.RemoteMixtureOfExperts` with `gate`'s weights, once all experts are declared."""
        from hivemind.moe import RemoteMixtureOfExperts
        from hivemind.moe.server import get_experts

        uids = [f"{prefix}.{i}" for i in range(num_experts)]
        deadline = time.monotonic() + 60
        while not all(get_experts(self.dht, uids)):
            if time.monotonic() > deadline:
                raise RuntimeError("the hivemind server did not declare all its experts within 60 s")
            time.sleep(0.5)
        options = {"forward_timeout": 120.0, "backward_timeout": 120.0, "timeout_after_k_min": 120.0, **options}
        layer = RemoteMixtureOfExperts(
            in_features=hidden_dim, grid_size=(num_experts,), dht=self.dht, uid_prefix=f"{prefix}.", k_best=k,
            **options,
        )
        copy_gate(gate, layer.proj)
        with torch.no_grad():
            layer(torch.zeros(1, hidden_dim))
        return layer

    def shutdown(self) -> None:
        self.dht.shutdown()

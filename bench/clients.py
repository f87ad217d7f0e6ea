"""The client side of each contender: dmoe's router, hivemind's RemoteMixtureOfExperts, sharing one gate."""

from __future__ import annotations

import threading
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
    its grid index knows all `num_experts` experts."""
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
    """The uids the router's grid index knows (its cached view of the DHT)."""
    return list(layer.index.replicas)


class HivemindClient:
    """A client-mode hivemind DHT joined to a hivemind server, and the MoE layers built on it.

    hivemind's DHT runs in a child process that was seen to die under load (BlockingIOError in its pipe), after
    which every call into it waits forever. Here each call checks the process first and starts a new DHT
    (counted in `restarts`) when it is gone, and a forward that does not return in `call_timeout` seconds fails.
    """

    def __init__(self, initial_peers, *, call_timeout: float = 300.0):
        import asyncio

        # hivemind's objects close themselves on garbage collection through the thread's event loop; without one
        # (uvloop's policy) every collection prints a traceback
        try:
            asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            asyncio.set_event_loop(asyncio.new_event_loop())
        self.initial_peers, self.call_timeout = list(initial_peers), call_timeout
        self.restarts, self.generation = 0, 0
        self.dht = self._start_dht()

    def _start_dht(self):
        import hivemind

        for _attempt in range(3):
            dht = hivemind.DHT(initial_peers=self.initial_peers, client_mode=True, start=True)
            time.sleep(0.2)
            if dht.is_alive():
                return dht
            dht.shutdown()
        raise RuntimeError("hivemind's DHT process died at start three times in a row")

    def ensure_alive(self, *, force: bool = False) -> None:
        """Start a new DHT (and so new layers) when the DHT process has died, or with `force` (it hangs)."""
        if self.dht.is_alive() and not force:
            return
        try:
            self.dht.kill()  # not shutdown(): it writes to the pipe that a wedged process no longer reads
        except Exception:
            pass
        self.dht = self._start_dht()
        self.restarts += 1
        self.generation += 1

    def layer(self, hidden_dim: int, prefix: str, num_experts: int, k: int, gate: nn.Linear, **options):
        """`hivemind.moe.RemoteMixtureOfExperts` with `gate`'s weights, once all experts are declared."""
        return HivemindLayer(self, hidden_dim, prefix, num_experts, k, gate, options)

    def _build(self, hidden_dim: int, prefix: str, num_experts: int, k: int, gate: nn.Linear, options: dict):
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
            in_features=hidden_dim,
            grid_size=(num_experts,),
            dht=self.dht,
            uid_prefix=f"{prefix}.",
            k_best=k,
            **options,
        )
        copy_gate(gate, layer.proj)
        with torch.no_grad():
            layer(torch.zeros(1, hidden_dim))
        return layer

    def shutdown(self) -> None:
        self.dht.shutdown()


class HivemindLayer(nn.Module):
    """hivemind's layer, rebuilt on a new DHT when the old one died, with a timeout on each forward."""

    def __init__(self, client: HivemindClient, hidden_dim, prefix, num_experts, k, gate, options):
        super().__init__()
        self.client, self.spec = client, (hidden_dim, prefix, num_experts, k, gate, options)
        self.inner = client._build(*self.spec)
        self._generation = client.generation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.client.ensure_alive()
        if self._generation != self.client.generation:
            self.inner = self.client._build(*self.spec)
            self._generation = self.client.generation
        dht = self.client.dht
        try:
            return call_with_timeout(
                self.inner, x, timeout=self.client.call_timeout, abort_if=lambda: not dht.is_alive()
            )
        except TimeoutError:
            self.client.ensure_alive(force=True)
            raise


class DHTDiedError(RuntimeError):
    """hivemind's DHT process died while a call was waiting on it (the call would wait forever)."""


def call_with_timeout(fn, *args, timeout: float, abort_if=None):
    """`fn(*args)` on a helper thread (with this thread's grad mode); TimeoutError if it does not return in time,
    `DHTDiedError` as soon as `abort_if()` (checked twice a second) says waiting is pointless."""
    outcome: dict = {}
    grad = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad):
                outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
        if thread.is_alive() and abort_if is not None and abort_if():
            raise DHTDiedError("hivemind's DHT process died during the call")
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

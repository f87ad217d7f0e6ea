"""Churn-proof routing against real peers and a real DHT on 127.0.0.1: the gate picks only experts that can
answer, the tokens of an expert that fails inside a call fall back to their next-best expert, and a replica
that refuses connections stays out of routing until it announces a newer record."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack

import pytest
import torch

from dht import DHTNode
from peer import Peer
from router_client import RemoteMixtureOfExperts
from tests.conftest import HIDDEN, PeerProcess, running_peer, wait_for_experts

STRICT = {"allow_zero_outputs": False, "k_min": 1, "forward_timeout": 5.0, "backward_timeout": 5.0}


def start_peer(stack: ExitStack, dht_node: DHTNode, experts: str, *, crash: bool = False, **config) -> Peer:
    """An in-process peer announcing `experts` to `dht_node`, stopped when `stack` closes (with `crash`, its DHT
    records stay behind, as after a crash)."""
    config = {"hidden_dim": HIDDEN, "seed": 0, "optimizer": "none", **config}
    config.setdefault("initial_peers", dht_node.visible_maddrs())
    return stack.enter_context(running_peer(announce=True, experts=experts, withdraw_on_exit=not crash, **config))


def make_moe(node: DHTNode, k_best: int = 2, favourite: int | None = None, **options) -> RemoteMixtureOfExperts:
    """A strict router over `ffn.0` … `ffn.3`; `favourite` is among every token's first choices."""
    options = {**STRICT, "cache_ttl": 30.0, **options}
    torch.manual_seed(0)
    moe = RemoteMixtureOfExperts(HIDDEN, (4,), "ffn", k_best, dht=node, **options)
    if favourite is not None:
        with torch.no_grad():
            moe.gate.bias.zero_()
            moe.gate.bias[favourite] = 4.0
    return moe


def reference(moe: RemoteMixtureOfExperts, modules: dict[int, torch.nn.Module], x: torch.Tensor, k: int):
    """The same MoE computed in-process over the experts in `modules` only (by grid index)."""
    allowed = sorted(modules)
    scores = moe.gate(x)[:, allowed]
    top_scores, top = scores.topk(k, dim=-1)
    outputs = torch.stack([modules[e](x) for e in allowed], dim=1)  # [tokens, experts, hidden]
    chosen = outputs.gather(1, top.unsqueeze(-1).expand(-1, -1, HIDDEN))
    return (torch.softmax(top_scores, dim=-1).unsqueeze(-1) * chosen).sum(1)


def modules_of(*peers: Peer) -> dict[int, torch.nn.Module]:
    return {int(uid.split(".")[1]): b.module for p in peers for uid, b in p.backends.items()}


def test_the_tokens_of_a_dead_expert_go_to_their_next_best_expert(dht_node):
    with ExitStack() as stack, ExitStack() as victim:
        a = start_peer(stack, dht_node, "ffn.[0:2]")
        b = start_peer(stack, dht_node, "ffn.2")
        c = start_peer(victim, dht_node, "ffn.3", crash=True)
        wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])
        moe = make_moe(dht_node, favourite=3)
        x = torch.randn(48, HIDDEN)
        with torch.no_grad():
            assert moe(x).shape == x.shape and moe.stats["rerouted_tokens"] == 0
        dead_endpoint = c.endpoint
        victim.close()  # ffn.3's only peer is gone; its record stays in the DHT

        local = modules_of(a, b)
        for step in range(10):
            x = torch.randn(48, HIDDEN)
            with torch.no_grad():
                y = moe(x)
                torch.testing.assert_close(y, reference(moe, local, x, 2), atol=1e-5, rtol=1e-5)
            if step == 0:
                assert moe.stats["rerouted_tokens"] == 48, "every token had ffn.3 among its two experts"
        assert moe.stats["masked_tokens"] == 0 and moe.stats["zero_tokens"] == 0
        assert moe.stats["rerouted_tokens"] == 48, "once ffn.3 is known dead, the gate leaves it out"
        assert moe.scores.is_dead(dead_endpoint)


def test_switch_mode_falls_back_to_the_next_best_expert(dht_node):
    with ExitStack() as stack, ExitStack() as victim:
        a = start_peer(stack, dht_node, "ffn.[0:3]")
        start_peer(victim, dht_node, "ffn.3", crash=True)
        wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])
        moe = make_moe(dht_node, k_best=1, favourite=3)
        victim.close()
        x = torch.randn(16, HIDDEN)
        with torch.no_grad():
            y = moe(x)
            scores = moe.gate(x)
            fallback = scores[:, :3].argmax(dim=-1)  # the best expert after ffn.3
            probability = torch.softmax(scores, dim=-1).gather(1, fallback[:, None])  # ffn.3 was still listed usable
            outputs = torch.stack([a.backends[f"ffn.{i}"].module(x) for i in range(3)], dim=1)
            expected = probability * outputs[torch.arange(16), fallback]
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        assert moe.stats["rerouted_tokens"] == 16 and moe.stats["masked_tokens"] == 0


def test_the_gate_gradient_through_a_fallback_equals_an_in_process_moe(dht_node):
    with ExitStack() as stack, ExitStack() as victim:
        a = start_peer(stack, dht_node, "ffn.[0:2]")
        b = start_peer(stack, dht_node, "ffn.2")
        start_peer(victim, dht_node, "ffn.3", crash=True)
        wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])
        moe = make_moe(dht_node, favourite=3)
        victim.close()

        x = torch.randn(32, HIDDEN, requires_grad=True)
        y = moe(x)  # the first call after the loss: every token falls back inside it
        assert moe.stats["rerouted_tokens"] == 32
        x_local = x.detach().clone().requires_grad_()
        y_local = reference(moe, modules_of(a, b), x_local, 2)
        torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(y)
        remote = torch.autograd.grad(y, [x, moe.gate.weight, moe.gate.bias], grad)
        local = torch.autograd.grad(y_local, [x_local, moe.gate.weight, moe.gate.bias], grad)
        for got, want in zip(remote, local, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert moe.stats["backward_failures"] == 0
        assert moe.stats["backward_requests"] == moe.stats["expert_requests"] - moe.stats["failed_requests"]
        backwards = a.servicer.requests["backward"] + b.servicer.requests["backward"]
        assert backwards == moe.stats["backward_requests"], "every expert that served, fallbacks included"


def test_a_dead_expert_is_left_out_until_it_announces_a_newer_record(dht_node):
    with ExitStack() as stack:
        start_peer(stack, dht_node, "ffn.[0:3]")
        c = start_peer(stack, dht_node, "ffn.3", update_period=100.0, expiration=120.0)
        wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])
        moe = make_moe(dht_node, favourite=3)
        x = torch.randn(8, HIDDEN)
        with torch.no_grad():
            moe(x)
        assert c.servicer.requests["forward"] == 1

        c.servicer.closing = True  # it answers UNAVAILABLE "shutting down", as a peer on its way out does
        with torch.no_grad():
            moe(x)
        calls, failures = sum(c.servicer.calls.values()), moe.stats["failed_requests"]
        assert failures == 1 and moe.scores.is_dead(c.endpoint)
        assert "shutting down" in moe.scores.dead()[c.endpoint]
        until = time.monotonic() + 2.5  # past several re-readings of the listing and past any ban
        while time.monotonic() < until:
            with torch.no_grad():
                moe(x)
            time.sleep(0.1)
        assert sum(c.servicer.calls.values()) == calls, "no request reaches a dead replica"
        assert moe.stats["failed_requests"] == failures and moe.stats["masked_tokens"] == 0

        c.servicer.closing = False
        c.directory.declare(c.uids, c.endpoint, expiration=120.0)  # what its announcer does every period
        deadline = time.monotonic() + 10
        while c.servicer.requests["forward"] == 1:
            assert time.monotonic() < deadline, "the re-announced expert should be routed to again"
            with torch.no_grad():
                moe(x)
            time.sleep(0.1)
        assert not moe.scores.is_dead(c.endpoint)


def test_a_replica_refusing_connections_is_marked_dead_and_its_sibling_serves(dht_node):
    with ExitStack() as stack, ExitStack() as victim:
        sibling = start_peer(stack, dht_node, "ffn.[0:4]")
        refusing = start_peer(victim, dht_node, "ffn.[0:4]", crash=True)
        wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)] * 2)
        moe = make_moe(dht_node)
        for _ in range(8):  # the refusing replica looks far faster: it is first in line
            moe.scores.record_success(refusing.endpoint, 1e-4)
            moe.scores.record_success(sibling.endpoint, 0.5)
        victim.close()

        x = torch.randn(16, HIDDEN)
        with torch.no_grad():
            y = moe(x)
            torch.testing.assert_close(y, reference(moe, modules_of(sibling), x, 2), atol=1e-5, rtol=1e-5)
        assert moe.scores.is_dead(refusing.endpoint)
        assert "connect" in moe.scores.dead()[refusing.endpoint].lower()
        assert moe.stats["failed_requests"] == 0, "the sibling served inside the same request"
        served = sibling.servicer.requests["forward"]

        replicas = moe.index.replicas_of("ffn.0")
        assert [r.endpoint for r in moe.scores.order(replicas)] == [sibling.endpoint]
        with torch.no_grad():
            for _ in range(5):
                moe(x)
        assert moe.stats["failed_requests"] == 0 and moe.stats["masked_tokens"] == 0
        assert sibling.servicer.requests["forward"] > served


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_killed_peer_is_routed_around_and_used_again_once_restarted(dht_node, peer_processes, tmp_path):
    port = free_port()
    common = ["--initial-peers", *dht_node.visible_maddrs(), "--hidden-dim", str(HIDDEN), "--seed", "0"]
    common += ["--optimizer", "none", "--update-period", "2", "--expiration", "30"]
    victim = [*common, "--experts", "ffn.3", "--port", str(port), "--identity", str(tmp_path / "id.pem")]
    peer_processes.append(PeerProcess([*common, "--experts", "ffn.[0:3]"]))
    peer_processes.append(PeerProcess(victim))
    wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])
    moe = make_moe(dht_node, favourite=3)
    x = torch.randn(16, HIDDEN)
    with torch.no_grad():
        moe(x)
        peer_processes[1].kill()  # SIGKILL: its record stays in the DHT, never renewed
        for _ in range(5):
            moe(x)
    assert moe.stats["rerouted_tokens"] == 16 and moe.stats["masked_tokens"] == 0
    endpoint = peer_processes[1].endpoint
    assert moe.scores.is_dead(endpoint)

    peer_processes.append(PeerProcess(victim))  # same port, same identity: a newer record of the same endpoint
    deadline = time.monotonic() + 30
    with torch.no_grad():
        while True:  # ffn.3 is every token's favourite: once usable it is chosen, and a failure would count
            assert time.monotonic() < deadline, "the restarted peer should be routed to again"
            usable = bool(moe.index.usable(moe.scores.unusable_endpoints())[moe.index.row("ffn.3")])
            failures = moe.stats["failed_requests"]
            moe(x)
            if usable and moe.stats["failed_requests"] == failures:
                break
            time.sleep(0.2)
    assert not moe.scores.is_dead(endpoint) and moe.stats["masked_tokens"] == 0

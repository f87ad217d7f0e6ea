"""RemoteMixtureOfExperts against real peers and a real DHT on 127.0.0.1."""

from __future__ import annotations

import textwrap
import time

import pytest
import torch

from dht import DHTNode, ExpertDirectory
from router_client import RemoteExpert, RemoteExpertError, RemoteMixtureOfExperts
from tests.conftest import HIDDEN, PeerProcess, swarm, wait_for_experts

CUSTOM_EXPERTS = textwrap.dedent("""
    import time
    import torch
    from peer import register_expert_class

    @register_expert_class("sleepy")
    class Sleepy(torch.nn.Module):
        def __init__(self, hidden_dim):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

        def forward(self, x):
            time.sleep(3.0)
            return x * self.scale

    @register_expert_class("nan")
    class ReturnsNaN(torch.nn.Module):
        def __init__(self, hidden_dim):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

        def forward(self, x):
            return x * self.scale * float("nan")
""")


@pytest.fixture
def custom_module(tmp_path) -> str:
    path = tmp_path / "custom_experts.py"
    path.write_text(CUSTOM_EXPERTS)
    return str(path)


def make_moe(node: DHTNode, grid=(4,), k_best=2, **options) -> RemoteMixtureOfExperts:
    options.setdefault("cache_ttl", 1.0)
    torch.manual_seed(0)
    return RemoteMixtureOfExperts(HIDDEN, grid, "ffn", k_best, dht=node, **options)


def local_reference(moe: RemoteMixtureOfExperts, backends: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    """The same MoE computed in-process with copies of the peers' expert modules."""
    uids = sorted(backends, key=lambda u: int(u.split(".")[1]))
    scores = moe.gate(x)
    top_scores, top_index = scores.topk(k, dim=-1)
    weights = torch.softmax(top_scores, dim=-1)
    outputs = torch.stack([backends[uid].module(x) for uid in uids], dim=1)  # [tokens, experts, hidden]
    chosen = outputs.gather(1, top_index.unsqueeze(-1).expand(-1, -1, HIDDEN))
    return (weights.unsqueeze(-1) * chosen).sum(1)


def test_remote_moe_equals_an_in_process_moe_with_the_same_experts(dht_node):
    with swarm(
        dht_node, {"experts": "ffn.[0:2]", "optimizer": "none"}, {"experts": "ffn.[2:4]", "optimizer": "none"}
    ) as peers:
        moe = make_moe(dht_node)
        x = torch.randn(3, 5, HIDDEN, requires_grad=True)
        y = moe(x)
        assert y.shape == x.shape
        chosen = moe.gate(x.reshape(-1, HIDDEN)).topk(2, dim=-1).indices.unique()
        assert sum(p.servicer.requests["forward"] for p in peers) == chosen.numel(), "one request per chosen expert"
        peers_used = len({int(i) // 2 for i in chosen})
        calls = sum(p.servicer.calls["Forward"] + p.servicer.calls["ForwardMany"] for p in peers)
        assert calls == peers_used, "the small requests for one peer travel in one call"

        backends = {uid: b for p in peers for uid, b in p.backends.items()}
        x_local = x.detach().clone().requires_grad_()
        y_local = local_reference(moe, backends, x_local.reshape(-1, HIDDEN), 2).reshape(x.shape)
        torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)

        grad = torch.randn_like(y)
        gate_grad = torch.autograd.grad(y, [x, moe.gate.weight], grad)
        gate_grad_local = torch.autograd.grad(y_local, [x_local, moe.gate.weight], grad)
        torch.testing.assert_close(gate_grad[0], gate_grad_local[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate_grad[1], gate_grad_local[1], atol=1e-5, rtol=1e-5)


def test_k_min_is_judged_per_token(dht_node, custom_module):
    # ffn.0 answers; ffn.1 to ffn.3 return NaN, which counts as a failure: a token has no expert to fall back to
    with swarm(
        dht_node,
        {"experts": "ffn.0"},
        {"experts": "ffn.[1:4]", "expert_cls": "nan", "custom_module": custom_module},
    ):
        moe = make_moe(dht_node, k_min=1)
        with torch.no_grad():  # force every token to pick one good and one bad expert: ffn.0 and ffn.2
            moe.gate.weight.zero_()
            moe.gate.bias.copy_(torch.tensor([2.0, 0.0, 1.0, -1.0]))
        x = torch.randn(6, HIDDEN)
        y = moe(x)
        assert torch.isfinite(y).all() and moe.stats["masked_tokens"] == 6

        strict = make_moe(dht_node, k_min=2)
        with torch.no_grad():
            strict.gate.load_state_dict(moe.gate.state_dict())
        with pytest.raises(RemoteExpertError, match="ffn.2"):
            strict(x)


def test_a_peer_returning_nan_is_masked_and_banned(dht_node, custom_module):
    with swarm(dht_node, {"experts": "ffn.[0:4]", "expert_cls": "nan", "custom_module": custom_module}) as peers:
        moe = make_moe(dht_node, allow_zero_outputs=True)
        y = moe(torch.randn(4, HIDDEN))
        assert torch.equal(y, torch.zeros_like(y))
        assert moe.scores.is_banned(peers[0].endpoint)
        assert "NaN" in moe.scores.banned()[peers[0].endpoint]
        with pytest.raises(RemoteExpertError, match="NaN"):
            make_moe(dht_node)(torch.randn(4, HIDDEN))


def test_a_peer_sleeping_past_the_deadline_is_cut_off(dht_node, custom_module):
    with swarm(dht_node, {"experts": "ffn.[0:4]", "expert_cls": "sleepy", "custom_module": custom_module}):
        moe = make_moe(dht_node, forward_timeout=1.0, allow_zero_outputs=True)
        started = time.monotonic()
        y = moe(torch.randn(4, HIDDEN))
        elapsed = time.monotonic() - started
        assert elapsed < 1.0 + 0.5, f"call took {elapsed:.2f} s with a 1 s deadline"
        assert torch.equal(y, torch.zeros_like(y)) and moe.stats["failed_requests"] >= 1


def test_remote_expert_matches_the_module_and_trains_it(dht_node):
    with swarm(dht_node, {"experts": "ffn.0", "optimizer": "sgd", "lr": 0.1}) as (peer,):
        expert = RemoteExpert("ffn.0", peer.endpoint, forward_timeout=5)
        backend = peer.backends["ffn.0"]
        x = torch.randn(3, HIDDEN, requires_grad=True)
        reference = type(backend.module)(HIDDEN)
        reference.load_state_dict(backend.module.state_dict())
        x_local = x.detach().clone().requires_grad_()
        y, y_local = expert(x), reference(x_local)
        torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-5)
        y.sum().backward()
        y_local.sum().backward()
        torch.testing.assert_close(x.grad, x_local.grad, atol=1e-5, rtol=1e-5)
        assert backend.update_count == 1
        with pytest.raises(RemoteExpertError, match="ffn.9"):
            RemoteExpert("ffn.9", peer.endpoint)(x)


@pytest.mark.slow
def test_with_two_replicas_killing_one_loses_no_tokens(dht_node, peer_processes):
    args = [
        "--initial-peers",
        *dht_node.visible_maddrs(),
        "--experts",
        "ffn.[0:4]",
        "--hidden-dim",
        str(HIDDEN),
        "--seed",
        "0",
        "--update-period",
        "2",
        "--expiration",
        "6",
    ]
    peer_processes.append(PeerProcess(args))
    peer_processes.append(PeerProcess(args))
    wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])
    directory = ExpertDirectory(dht_node, cache_ttl=0)
    deadline = time.monotonic() + 20
    while any(len(r) < 2 for r in directory.get([f"ffn.{i}" for i in range(4)], use_cache=False).values()):
        assert time.monotonic() < deadline, "both replicas should be announced"
        time.sleep(0.2)
    moe = make_moe(dht_node, forward_timeout=5.0)
    x = torch.randn(32, HIDDEN)
    moe(x)
    peer_processes[0].kill()
    for _ in range(5):
        moe(x)
    assert moe.stats["masked_tokens"] == 0 and moe.stats["zero_tokens"] == 0


@pytest.mark.slow
def test_killing_a_peer_mid_training_does_not_raise_and_the_loss_falls(dht_node, peer_processes):
    common = [
        "--initial-peers",
        *dht_node.visible_maddrs(),
        "--hidden-dim",
        str(HIDDEN),
        "--seed",
        "0",
        "--lr",
        "0.01",
        "--update-period",
        "2",
        "--expiration",
        "6",
    ]
    peer_processes.append(PeerProcess([*common, "--experts", "ffn.[0:2]"]))
    peer_processes.append(PeerProcess([*common, "--experts", "ffn.[2:4]"]))
    wait_for_experts(dht_node, [f"ffn.{i}" for i in range(4)])

    torch.manual_seed(0)
    moe = make_moe(dht_node, allow_zero_outputs=True, forward_timeout=3.0, backward_timeout=3.0)
    head = torch.nn.Linear(HIDDEN, 1)
    optimizer = torch.optim.Adam([*moe.parameters(), *head.parameters()], lr=0.01)
    w_true = torch.randn(HIDDEN, 1)
    losses = []
    for step in range(100):
        x = torch.randn(64, HIDDEN)
        target = torch.tanh(x @ w_true)
        loss = torch.nn.functional.mse_loss(head(moe(x)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 50:
            peer_processes[1].kill()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, f"loss went from {first:.3f} to {last:.3f}"
    assert moe.stats["failed_requests"] >= 1, "the killed peer should have been noticed"


def test_hedging_sends_a_second_copy_when_the_first_replica_is_slow(dht_node, custom_module):
    from router_client import background
    from router_client.dispatch import Dispatcher, ExpertJob
    from router_client.replicas import PeerScores
    from router_client.transport import ExpertTransport

    with swarm(
        dht_node,
        {"experts": "ffn.0", "expert_cls": "sleepy", "custom_module": custom_module},
        {"experts": "ffn.0"},
    ) as (slow, fast):
        replicas = ExpertDirectory(dht_node, cache_ttl=0).get(["ffn.0"], use_cache=False)
        scores = PeerScores()
        for _ in range(10):  # the slow replica usually answers in 10 ms: hedge once it takes longer
            scores.record_success(slow.endpoint, 0.01)
        x = torch.randn(4, HIDDEN)
        job = ExpertJob("ffn.0", torch.arange(4), torch.zeros(4, dtype=torch.int64))

        async def dispatch(hedge: bool):
            dispatcher = Dispatcher(ExpertTransport(), scores, hedge=hedge)
            return await dispatcher.run(
                [job],
                lambda _: [x],
                replicas,
                backward=False,
                deadline=time.monotonic() + 2.5,
                required=torch.ones(4, dtype=torch.int64),
                grace=0.0,
                expected_shapes=lambda _: [(4, HIDDEN)],
                preferred={"ffn.0": slow.endpoint},
            )

        started = time.monotonic()
        (result,) = background.run(dispatch(hedge=True), timeout=5)
        assert result.ok and result.replica.endpoint == fast.endpoint
        assert time.monotonic() - started < 1.0, "the hedged copy should answer long before the slow one"
        (unhedged,) = background.run(dispatch(hedge=False), timeout=5)
        assert not unhedged.ok, "without hedging the slow replica holds the call until the deadline"


def test_training_reuses_the_peers_forward_graphs_and_trains_without_input_grad(dht_node):
    with swarm(dht_node, {"experts": "ffn.[0:4]", "optimizer": "sgd", "lr": 0.1}) as (peer,):
        moe = make_moe(dht_node)
        x = torch.randn(8, HIDDEN)  # a first layer: its input needs no grad, the experts still train
        moe(x).pow(2).sum().backward()
        served = moe.stats["backward_requests"]
        assert served >= 2 and moe.stats["backward_failures"] == 0
        assert sum(b.update_count for b in peer.backends.values()) == served
        assert (peer.graphs.hits, peer.graphs.misses, len(peer.graphs)) == (served, 0, 0)
        with torch.no_grad():
            moe(x)
        assert len(peer.graphs) == 0, "inference keeps nothing on the peer"
        RemoteExpert("ffn.0", peer.endpoint)(x).sum().backward()
        assert peer.graphs.hits == served + 1

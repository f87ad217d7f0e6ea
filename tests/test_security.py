"""Private swarms and hardening: swarm key, TLS and mTLS, per-client limits, poisoned data, verification."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dht import DHTNode, ExpertDirectory
from proto import CLIENT_ID_METADATA, deserialize_tensor, expert_pb2, expert_pb2_grpc, serialize_tensor
from router_client import RemoteExpert, RemoteExpertError, RemoteMixtureOfExperts
from tests.certs import CertificateAuthority
from tests.conftest import REPO, PeerProcess, running_peer, swarm


def test_a_wrong_or_missing_swarm_key_is_refused_with_unauthenticated():
    with running_peer(swarm_key="k1") as peer:
        x = torch.randn(2, 16)
        for key in ("k2", None):
            with pytest.raises(RemoteExpertError, match="UNAUTHENTICATED"):
                RemoteExpert("ffn.0", peer.endpoint, swarm_key=key)(x)
        assert RemoteExpert("ffn.0", peer.endpoint, swarm_key="k1")(x).shape == (2, 16)
        with grpc.insecure_channel(peer.endpoint) as channel:  # orchestrators may still probe health
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            stream = expert_pb2_grpc.ExpertServiceStub(channel).ForwardStream(iter([]), timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_swarm_key_falls_back_to_the_environment(monkeypatch):
    with running_peer(swarm_key="k1") as peer:
        monkeypatch.setenv("DMOE_SWARM_KEY", "k1")
        assert RemoteExpert("ffn.0", peer.endpoint)(torch.randn(1, 16)).shape == (1, 16)


def test_mutual_tls_accepts_its_own_ca_and_refuses_another(tmp_path):
    ours, theirs = CertificateAuthority(tmp_path, "ca-ours"), CertificateAuthority(tmp_path, "ca-theirs")
    server_cert, server_key = ours.issue("peer", server=True)
    good_cert, good_key = ours.issue("client-good", server=False)
    bad_cert, bad_key = theirs.issue("client-bad", server=False)
    with running_peer(tls_cert=server_cert, tls_key=server_key, tls_ca=ours.ca_path) as peer:
        endpoint = f"localhost:{peer.port}"
        x = torch.randn(2, 16)
        good = RemoteExpert("ffn.0", endpoint, tls_ca=ours.ca_path, tls_cert=good_cert, tls_key=good_key)
        assert good(x).shape == (2, 16)
        bad = RemoteExpert(
            "ffn.0", endpoint, tls_ca=ours.ca_path, tls_cert=bad_cert, tls_key=bad_key, forward_timeout=3
        )
        with pytest.raises(RemoteExpertError):
            bad(x)
        with pytest.raises(RemoteExpertError):  # and plain TCP gets nothing either
            RemoteExpert("ffn.0", endpoint, forward_timeout=3)(x)


SLOW = textwrap.dedent("""
    import time
    import torch
    from peer import register_expert_class

    @register_expert_class("slow_echo")
    class SlowEcho(torch.nn.Module):
        def __init__(self, hidden_dim):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(hidden_dim))

        def forward(self, x):
            time.sleep(0.05)
            return x * self.scale
""")


def test_a_flooding_client_does_not_starve_another(tmp_path):
    module = tmp_path / "slow.py"
    module.write_text(SLOW)
    with running_peer(
        experts="s.0", expert_cls="slow_echo", custom_module=str(module), max_requests_per_client=4, max_batch_size=8
    ) as peer:

        def call(client_id: str, channel) -> grpc.StatusCode:
            request = expert_pb2.ExpertRequest(uid="s.0", tensors=[serialize_tensor(torch.ones(4, 16))])
            try:
                expert_pb2_grpc.ExpertServiceStub(channel).Forward(
                    request, timeout=20, metadata=((CLIENT_ID_METADATA, client_id),)
                )
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        with grpc.insecure_channel(peer.endpoint) as flood, grpc.insecure_channel(peer.endpoint) as polite:
            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                flooding = [pool.submit(call, "flood", flood) for _ in range(40)]
                polite_codes = [call("polite", polite) for _ in range(3)]
                flood_codes = [f.result() for f in flooding]
        assert polite_codes == [grpc.StatusCode.OK] * 3
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in flood_codes
        assert len(peer.servicer.experts["s.0"].forward_queue) == 0


def test_poisoned_gradients_are_skipped_and_the_weights_stay(peer, stub):
    backend = peer.backends["ffn.0"]
    weights = {k: v.clone() for k, v in backend.module.state_dict().items()}
    x = torch.randn(4, 16)
    for grad in (torch.full((4, 16), float("inf")), torch.full((4, 16), 1e30)):
        request = expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(x), serialize_tensor(grad)])
        try:
            stub.Backward(request, timeout=10)  # the absurdly large one is answered, its update skipped
        except grpc.RpcError as exc:  # the infinite one is refused outright
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert backend.updates_skipped == 2 and backend.update_count == 0
    for name, value in backend.module.state_dict().items():
        torch.testing.assert_close(value, weights[name])
    response = stub.Forward(expert_pb2.ExpertRequest(uid="ffn.0", tensors=[serialize_tensor(x)]), timeout=10)
    assert torch.isfinite(deserialize_tensor(response.tensors[0])).all()


def _rogue_swarm(dht_node):
    honest = {"experts": "ffn.[0:2]", "optimizer": "none", "seed": 0}
    # plausible but wrong answers; a rogue neither loads the honest state nor averages with it
    rogue = {"experts": "ffn.[0:2]", "optimizer": "none", "seed": 1, "catch_up": False, "sync_every": 0}
    return swarm(dht_node, honest, dict(honest), rogue)


def test_verification_catches_and_bans_a_rogue_replica(dht_node):
    with _rogue_swarm(dht_node) as (honest_a, honest_b, rogue):
        torch.manual_seed(0)
        moe = RemoteMixtureOfExperts(16, (2,), "ffn", 1, dht=dht_node, verify_fraction=0.3, cache_ttl=1.0)
        requests = 0
        while rogue.endpoint not in moe.verifier.liars and requests < 300:
            moe(torch.randn(8, 16))
            requests += 2
            time.sleep(0.01)  # the checks run in the background
        assert rogue.endpoint in moe.verifier.liars, f"not caught after {requests} requests"
        assert honest_a.endpoint not in moe.verifier.liars and honest_b.endpoint not in moe.verifier.liars
        time.sleep(0.5)
        before = rogue.servicer.requests["forward"]
        for _ in range(20):
            moe(torch.randn(8, 16))
        assert rogue.servicer.requests["forward"] == before, "a banned liar gets no more traffic"


def test_trusted_peers_restricts_routing_to_known_peers(dht_node, tmp_path):
    with _rogue_swarm(dht_node) as (honest_a, honest_b, rogue):
        trusted = tmp_path / "trusted.txt"
        trusted.write_text(f"# our peers\n{honest_a.dht_node.peer_id}\n{honest_b.dht_node.peer_id}\n")
        moe = RemoteMixtureOfExperts(16, (2,), "ffn", 2, dht=dht_node, trusted_peers=str(trusted), cache_ttl=1.0)
        for _ in range(30):
            moe(torch.randn(8, 16))
        assert rogue.servicer.requests["forward"] == 0
        assert honest_a.servicer.requests["forward"] + honest_b.servicer.requests["forward"] >= 30


@pytest.mark.slow
def test_hostile_client_script_against_a_running_peer(peer_processes):
    process = PeerProcess(["--experts", "ffn.[0:2]", "--hidden-dim", "64", "--swarm-key", "k1"])
    peer_processes.append(process)
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "hostile_client.py"), process.endpoint, "--swarm-key", "k1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "weights unchanged: True"):
        assert expected in result.stdout


def test_a_rogue_node_flooding_the_prefix_cannot_hide_or_replace_real_experts(dht_node):
    with swarm(dht_node, {"experts": "ffn.[0:4]", "optimizer": "none"}) as (peer,):
        with DHTNode(initial_peers=dht_node.visible_maddrs()) as rogue_node:
            rogue = ExpertDirectory(rogue_node)
            junk = [f"ffn.{i}" for i in range(4, 200)]
            rogue.declare(junk, "127.0.0.1:9", expiration=60)  # experts that do not exist anywhere
            rogue.declare([f"ffn.{i}" for i in range(4)], "127.0.0.1:9", expiration=600)  # fake replicas
            listing = ExpertDirectory(dht_node, cache_ttl=0).list_experts("ffn", use_cache=False)
            for uid in (f"ffn.{i}" for i in range(4)):
                assert peer.endpoint in [r.endpoint for r in listing[uid]], f"{uid} lost its real replica"

            moe = RemoteMixtureOfExperts(16, (4,), "ffn", 2, dht=dht_node, cache_ttl=1.0, forward_timeout=3)
            for _ in range(5):
                y = moe(torch.randn(8, 16))
            assert torch.isfinite(y).all() and moe.stats["zero_tokens"] == 0
